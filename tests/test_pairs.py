"""sample_pairs, MixPairs and PairFeed: all of mixup's randomness, drawn once and seeded."""
import numpy as np
import pytest
import scipy.stats
import torch

from fastgenlabel import MixPairs, sample_pairs
from fastgenlabel.functional import LAM_MODES, PAIRINGS, PairFeed


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("lam_mode", LAM_MODES)
def test_seeded_draws_are_deterministic(pairing, lam_mode):
    a = sample_pairs(33, 0.7, pairing=pairing, lam_mode=lam_mode, generator=123)
    b = sample_pairs(33, 0.7, pairing=pairing, lam_mode=lam_mode, generator=np.random.default_rng(123))
    torch.testing.assert_close(a.perm, b.perm, rtol=0, atol=0)
    torch.testing.assert_close(a.lam, b.lam, rtol=0, atol=0)
    assert a.perm.dtype == torch.int64 and a.lam.dtype == torch.float32
    assert a.perm.shape == a.lam.shape == (33,)
    c = sample_pairs(33, 0.7, pairing=pairing, lam_mode=lam_mode, generator=124)
    assert not torch.equal(a.lam, c.lam)


def test_a_generator_advances_between_batches():
    gen = np.random.default_rng(5)
    first, second = sample_pairs(50, generator=gen), sample_pairs(50, generator=gen)
    assert not torch.equal(first.perm, second.perm)
    gen = np.random.default_rng(5)
    torch.testing.assert_close(sample_pairs(50, generator=gen).perm, first.perm, rtol=0, atol=0)
    torch.testing.assert_close(sample_pairs(50, generator=gen).perm, second.perm, rtol=0, atol=0)


@pytest.mark.parametrize("b", [2, 3, 10, 64])
def test_permutation_is_a_permutation(b):
    pairs = sample_pairs(b, generator=b)
    assert torch.equal(torch.sort(pairs.perm).values, torch.arange(b))


@pytest.mark.parametrize("b", [1, 2, 7, 8])
def test_flip_is_the_reversed_batch(b):
    pairs = sample_pairs(b, pairing="flip", generator=0)
    assert pairs.perm.tolist() == list(range(b))[::-1]
    x = torch.randn(b, 3, dtype=torch.float64)
    assert torch.equal(x[pairs.perm], x.flip(0))  # timm's partner


@pytest.mark.parametrize("b", [1, 2, 7, 8])
def test_roll_is_torchvisions_roll_by_one(b):
    pairs = sample_pairs(b, pairing="roll", generator=0)
    assert pairs.perm.tolist() == [(i - 1) % b for i in range(b)]
    x = torch.randn(b, 3, dtype=torch.float64)
    assert torch.equal(x[pairs.perm], x.roll(1, 0))  # torchvision's partner


@pytest.mark.parametrize("pairing", PAIRINGS)
def test_batch_lambda_is_shared_and_sample_lambda_varies(pairing):
    batch = sample_pairs(40, 1.0, pairing=pairing, lam_mode="batch", generator=1)
    assert bool((batch.lam == batch.lam[0]).all())
    sample = sample_pairs(40, 1.0, pairing=pairing, lam_mode="sample", generator=1)
    assert torch.unique(sample.lam).numel() > 30
    for lam in (batch.lam, sample.lam):
        assert bool(((lam >= 0) & (lam <= 1)).all())


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_lambda_follows_beta_alpha_alpha(alpha):
    lam = sample_pairs(4000, alpha, lam_mode="sample", generator=int(alpha * 10)).lam.double().numpy()
    assert scipy.stats.kstest(lam, scipy.stats.beta(alpha, alpha).cdf).pvalue > 1e-3


@pytest.mark.parametrize("alpha", [0, 0.0])
@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("lam_mode", LAM_MODES)
def test_no_mixing_for_alpha_zero(alpha, pairing, lam_mode):
    pairs = sample_pairs(9, alpha, pairing=pairing, lam_mode=lam_mode, generator=0)
    assert pairs.perm.tolist() == list(range(9))
    assert pairs.lam.tolist() == [1.0] * 9


@pytest.mark.parametrize("alpha", [-1.0, -1e-9, -1])
def test_a_negative_alpha_is_refused_not_read_as_no_mixing(alpha):
    from fastgenlabel.functional.pairs import PairFeed
    from fastgenlabel.loader import LoaderConfig

    with pytest.raises(ValueError, match="alpha: expected a finite number >= 0"):
        sample_pairs(8, alpha=alpha, generator=0)
    with pytest.raises(ValueError, match="alpha: expected a finite number >= 0"):
        PairFeed(alpha, batch_size=8)
    with pytest.raises(ValueError, match="alpha: expected a finite number >= 0"):
        LoaderConfig(alpha=alpha)


@pytest.mark.parametrize("pairing", PAIRINGS)
@pytest.mark.parametrize("lam_mode", LAM_MODES)
def test_empty_and_single_batches(pairing, lam_mode):
    empty = sample_pairs(0, pairing=pairing, lam_mode=lam_mode, generator=0)
    assert len(empty) == 0 and empty.perm.shape == (0,) and empty.lam.shape == (0,)
    one = sample_pairs(1, pairing=pairing, lam_mode=lam_mode, generator=0)
    assert one.perm.tolist() == [0] and 0 <= float(one.lam[0]) <= 1
    assert len(sample_pairs(np.int64(3), generator=0)) == 3


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": -1}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": "4"}, "batch_size"),
        ({"batch_size": None}, "batch_size"),
        ({"pairing": "shuffle"}, "pairing"),
        ({"pairing": None}, "pairing"),
        ({"lam_mode": "elementwise"}, "lam_mode"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": float("inf")}, "alpha"),
        ({"alpha": "one"}, "alpha"),
        ({"alpha": None}, "alpha"),
        ({"generator": -3}, "generator"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = {"batch_size": 4, **kwargs}
    with pytest.raises(ValueError, match=name):
        sample_pairs(args.pop("batch_size"), **args)


def test_generator_of_the_wrong_type_raises_type_error():
    with pytest.raises(TypeError, match="generator"):
        sample_pairs(4, generator="seed")
    with pytest.raises(TypeError, match="generator"):
        sample_pairs(4, generator=np.random.RandomState(0))  # the legacy NumPy API


@pytest.mark.parametrize(
    "perm, lam, exc",
    [
        (torch.tensor([0, 2]), torch.tensor([0.5, 0.5]), ValueError),  # partner out of range
        (torch.tensor([0, -1]), torch.tensor([0.5, 0.5]), ValueError),
        (torch.tensor([0, 1]), torch.tensor([0.5, 1.5]), ValueError),  # lam outside [0, 1]
        (torch.tensor([0, 1]), torch.tensor([0.5, float("nan")]), ValueError),
        (torch.tensor([0, 1]), torch.tensor([0.5]), ValueError),  # shapes differ
        (torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0.5, 0.5]), TypeError),
        (torch.tensor([0, 1]), torch.tensor([0, 1]), TypeError),  # integer lam
        (np.array([0, 1]), torch.tensor([0.5, 0.5]), TypeError),
    ],
)
def test_mixpairs_validates(perm, lam, exc):
    with pytest.raises(exc, match="MixPairs"):
        MixPairs(perm, lam)


def test_mixpairs_to_keeps_values():
    pairs = sample_pairs(5, generator=0)
    moved = pairs.to("cpu")
    assert torch.equal(moved.perm, pairs.perm) and torch.equal(moved.lam, pairs.lam)


def test_pair_feed_is_a_pure_function_of_where_the_batch_is():
    feed = PairFeed(1.0, seed=5, batch_size=8)
    a, b = feed.draw(8, 2, 3), feed.draw(8, 2, 3)
    assert torch.equal(a.perm, b.perm) and torch.equal(a.lam, b.lam)
    assert not torch.equal(feed.draw(8, 2, 4).lam, a.lam)
    other_rank = PairFeed(1.0, seed=5, shard_id=1, batch_size=8)
    assert not torch.equal(other_rank.draw(8, 2, 3).lam, a.lam)

    class Info:  # DALI's BatchInfo, as external_source(batch_info=True) passes it
        epoch_idx, iteration = 2, 3

    perm, lam = feed(Info())
    np.testing.assert_array_equal(np.concatenate(perm), a.perm.numpy())
    assert perm[0].shape == lam[0].shape == (1,) and lam[0].dtype == np.float32
    with pytest.raises(ValueError, match="pairing"):
        PairFeed(1.0, pairing="shuffle", batch_size=2)


def test_pair_feed_is_still_importable_from_the_dali_package_without_dali():
    import subprocess
    import sys

    code = ("import sys; import fastgenlabel.dali as d, fastgenlabel.dali.stages as s; "
            "from fastgenlabel.functional.pairs import PairFeed, pair_generator, split_pairs; "
            "assert d.PairFeed is s.PairFeed is PairFeed and d.split_pairs is split_pairs; "
            "assert d.pair_generator is pair_generator; "
            "assert 'nvidia.dali' not in sys.modules, 'DALI imported at import time'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_moving_pairs_does_not_validate_them_again(monkeypatch):
    """``MixPairs.to`` copies already validated pairs; re-checking on a GPU would cost three syncs."""
    pairs = sample_pairs(9, 1.0, lam_mode="sample", generator=3)

    def refuse(self):
        raise AssertionError("validated again")

    monkeypatch.setattr(MixPairs, "__post_init__", refuse)
    moved = pairs.to("cpu")
    assert isinstance(moved, MixPairs) and moved is not pairs
    assert torch.equal(moved.perm, pairs.perm) and torch.equal(moved.lam, pairs.lam)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_pairs_to_the_gpu_and_back_are_equal():
    pairs = sample_pairs(33, 1.0, lam_mode="sample", generator=4)
    moved = pairs.to("cuda")
    assert moved.perm.is_cuda and moved.lam.is_cuda
    back = moved.to("cpu")
    assert torch.equal(back.perm, pairs.perm) and torch.equal(back.lam, pairs.lam)


def test_a_torch_generator_is_taken_and_advances():
    """torch users pass torch generators: the same seed gives the same pairs, and the generator's
    state moves on so that the next batch differs, as with a NumPy generator."""
    g = torch.Generator().manual_seed(5)
    first, second = sample_pairs(40, 0.4, lam_mode="sample", generator=g), sample_pairs(40, 0.4, generator=g)
    again = sample_pairs(40, 0.4, lam_mode="sample", generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(again.perm, first.perm, rtol=0, atol=0)
    torch.testing.assert_close(again.lam, first.lam, rtol=0, atol=0)
    assert not torch.equal(first.perm, second.perm)
