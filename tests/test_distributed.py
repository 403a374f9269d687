"""Two-process gloo runs: merged statistics equal a single fit on the union; ranks agree."""
import os

import numpy as np
import pytest
from gloo import run_ranks

import fastgenlabel as fg
from fastgenlabel.distributed import broadcast_model, fit_distributed, model_checksum

K, D = 4, 3
MODELS = {
    "gaussian-full": lambda: fg.GaussianClassModel("full"),
    "gaussian-diag": lambda: fg.GaussianClassModel("diag", prior="empirical"),
    "gaussian-tied": lambda: fg.GaussianClassModel("tied"),
    "kde": lambda: fg.KDEClassModel(),
    "kde-capped": lambda: fg.KDEClassModel(max_points_per_class=5),
}



def _data(seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(90, D)) + np.repeat(np.arange(K), [30, 25, 20, 15])[:, None]
    y = np.repeat(np.arange(K), [30, 25, 20, 15])
    order = rng.permutation(len(y))
    return z[order], y[order]


def _worker(rank, world, result_dir):
    z, y = _data()
    for kind, make in MODELS.items():
        # Uneven shards: rank 0 gets 60 rows, rank 1 gets 30.
        lo, hi = (0, 60) if rank == 0 else (60, 90)
        model = fit_distributed(make(), z[lo:hi], y[lo:hi], K)
        ll = model.log_likelihood(z)
        # A refit on each rank's own data, then rank 0's broadcast to rank 1.
        refit = make().fit(z[:45] if rank == 0 else z[45:], y[:45] if rank == 0 else y[45:], K)
        refit = broadcast_model(refit, src=0)
        np.savez(os.path.join(result_dir, f"{kind}-rank{rank}.npz"), ll=ll, checksum=model_checksum(model),
                 refit=model_checksum(refit))


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("gloo")
    run_ranks(_worker, str(out))
    return out


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_two_rank_fit_matches_single_process(kind, two_rank_results):
    r0, r1 = (np.load(two_rank_results / f"{kind}-rank{r}.npz") for r in range(2))
    assert str(r0["checksum"]) == str(r1["checksum"])
    np.testing.assert_array_equal(r0["ll"], r1["ll"])
    z, y = _data()
    single = MODELS[kind]().fit(z, y, K)
    np.testing.assert_allclose(r0["ll"], single.log_likelihood(z), rtol=1e-10, atol=1e-10)
    expected_refit = model_checksum(MODELS[kind]().fit(z[:45], y[:45], K))
    assert str(r0["refit"]) == str(r1["refit"]) == expected_refit


def test_checksum_differs_for_different_models():
    z, y = _data()
    a = fg.GaussianClassModel().fit(z, y, K)
    b = fg.GaussianClassModel().fit(z[:-1], y[:-1], K)
    assert model_checksum(a) != model_checksum(b)
    assert model_checksum(a) == model_checksum(fg.GaussianClassModel().fit(z, y, K))


def test_gathered_stats_reject_unknown_type():
    with pytest.raises(TypeError, match="stats"):
        from fastgenlabel.distributed import all_gather_stats

        all_gather_stats(object())


def _mismatch_worker(rank, world, scenario, result_dir):
    """Each rank makes its part of a disagreement; the error each rank gets is written down."""
    import torch

    from fastgenlabel.fit.streaming import StreamingFit

    z, y = _data(rank)
    try:
        if scenario == "covariance":
            fit_distributed(fg.GaussianClassModel("full" if rank == 0 else "diag"), z, y, K)
        elif scenario == "reg":
            fit_distributed(fg.GaussianClassModel("full", reg=1e-4 * (rank + 1)), z, y, K)
        elif scenario == "d":
            fit_distributed(fg.GaussianClassModel("diag"), z[:, : D - rank], y, K)
        elif scenario == "kde-seed":
            fit_distributed(fg.KDEClassModel(max_points_per_class=5, seed=rank), z, y, K)
        elif scenario == "streaming-k":
            fit = StreamingFit(fg.GaussianClassModel("diag"), num_classes=K + rank)
            fit.update(torch.from_numpy(z), torch.from_numpy(y))
            fit.result()
        elif scenario == "broadcast-unfitted":
            model = fg.GaussianClassModel("full")
            if rank == 0:
                model.fit(z, y, K)
            broadcast_model(model, src=0)
        else:
            raise AssertionError(scenario)
        message = "no error"
    except ValueError as e:
        message = str(e)
    with open(os.path.join(result_dir, f"{scenario}-{rank}.txt"), "w") as f:
        f.write(message)


@pytest.mark.slow
@pytest.mark.parametrize("scenario,words", [
    ("covariance", "kind and options"), ("reg", "kind and options"), ("d", "d (features)"),
    ("kde-seed", "kind and options"), ("streaming-k", "K (classes)"), ("broadcast-unfitted", "fitted model"),
])
def test_ranks_that_disagree_all_get_the_same_error_not_a_hang(scenario, words, tmp_path):
    run_ranks(_mismatch_worker, scenario, str(tmp_path), timeout=120)
    messages = [(tmp_path / f"{scenario}-{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1] and words in messages[0], messages
