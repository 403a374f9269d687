"""Two-process gloo: StreamingFit.result() all-reduces; ranks agree bit for bit; an empty rank takes part."""
import os

import numpy as np
import pytest
from gloo import run_ranks

import fastgenlabel as fg
from fastgenlabel.distributed import model_checksum
from fastgenlabel.fit import StreamingFit

K, D = 4, 3
MODELS = {
    "gaussian-full": lambda: fg.GaussianClassModel("full"),
    "gaussian-diag": lambda: fg.GaussianClassModel("diag"),
    "gaussian-tied": lambda: fg.GaussianClassModel("tied"),
    "kde-capped": lambda: fg.KDEClassModel(max_points_per_class=6),
}



def _data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, K, 120)
    return rng.normal(size=(120, D)) + y[:, None], y


def _stream(fit, z, y, step=7):
    for i in range(0, len(y), step):
        fit.update(z[i:i + step], y[i:i + step])
    return fit


def _worker(rank, world, result_dir):
    z, y = _data()
    out = {}
    for kind, make in MODELS.items():
        shard = slice(rank, None, world)  # round-robin shards, as a DistributedSampler deals them
        model = _stream(StreamingFit(make(), K, chunk_rows=10), z[shard], y[shard]).result()
        out[kind] = model_checksum(model)
        out[kind + "-ll"] = model.log_likelihood(z)
        # Rank 1 sees nothing: the union is rank 0's data.
        empty = StreamingFit(make(), K)
        if rank == 0:
            _stream(empty, z[:50], y[:50])
        empty_model = empty.result()
        out[kind + "-empty"] = model_checksum(empty_model)
        out[kind + "-empty-ll"] = empty_model.log_likelihood(z)
    # all_reduce_stats (sums) against all_gather_stats (merge in rank order) on uneven shards.
    from fastgenlabel.distributed import all_gather_stats, all_reduce_stats

    for cov in ("full", "diag", "tied"):
        lo, hi = (0, 80) if rank == 0 else (80, 120)
        local = fg.GaussianClassModel(cov).compute_stats(z[lo:hi], y[lo:hi], K)
        a, b = all_reduce_stats(local), all_gather_stats(local)
        out[f"reduce-{cov}"] = np.stack([np.abs(a.m2 - b.m2).max().item(), np.abs(a.mean - b.mean).max().item(),
                                         np.abs(a.count - b.count).max().item()])
    # Every rank empty: a clear error on every rank.
    try:
        StreamingFit(fg.GaussianClassModel(), K).result()
        out["all-empty"] = "no error"
    except ValueError as e:
        out["all-empty"] = str(e)
    np.savez(os.path.join(result_dir, f"rank{rank}.npz"), **out)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("fitgloo")
    run_ranks(_worker, str(out))
    return [np.load(out / f"rank{r}.npz") for r in range(2)]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_streamed_shards_all_reduce_to_one_fit(kind, results):
    r0, r1 = results
    assert str(r0[kind]) == str(r1[kind])
    np.testing.assert_array_equal(r0[kind + "-ll"], r1[kind + "-ll"])
    z, y = _data()
    single = MODELS[kind]().fit(z, y, K)
    np.testing.assert_allclose(r0[kind + "-ll"], single.log_likelihood(z), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_rank_without_samples_takes_part(kind, results):
    r0, r1 = results
    z, y = _data()
    assert str(r0[kind + "-empty"]) == str(r1[kind + "-empty"])
    single = MODELS[kind]().fit(z[:50], y[:50], K)
    if kind.startswith("kde"):  # the kept points merge exactly
        assert str(r0[kind + "-empty"]) == model_checksum(single)
    else:  # the Gaussian sums divide by the count again: equal up to rounding
        np.testing.assert_allclose(r0[kind + "-empty-ll"], single.log_likelihood(z), rtol=1e-12, atol=1e-12)


def test_every_rank_empty_raises_on_every_rank(results):
    for r in results:
        assert "empty" in str(r["all-empty"])


@pytest.mark.parametrize("cov", ["full", "diag", "tied"])
def test_all_reduce_matches_all_gather(cov, results):
    for r in results:
        m2_err, mean_err, count_err = r[f"reduce-{cov}"]
        assert count_err == 0 and mean_err < 1e-12 and m2_err < 1e-10


def test_all_reduce_stats_rejects_unknown_type():
    from fastgenlabel.distributed import all_reduce_stats

    with pytest.raises(TypeError, match="stats"):
        all_reduce_stats(object())
