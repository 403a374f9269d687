"""fastgenlabel.experiments: datasets, protocols, training runs and the ``reproduce`` command."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from fastgenlabel import cli  # noqa: E402
from fastgenlabel.experiments import datasets as ds  # noqa: E402
from fastgenlabel.experiments.protocol import PROTOCOLS, protocol_for, tabular_batch_size, with_epochs  # noqa: E402
from fastgenlabel.experiments.training import METHODS, train_run  # noqa: E402

# name: (d, K, train size, validation size or None, test size)
SHAPES = {
    "2d-cube": (2, 2, 40, None, 20_000),
    "3d-cube": (3, 8, 160, None, 80_000),
    "grid9": (2, 9, 45_000, None, 9_000),
    "moon": (2, 2, 1000, 1000, 1000),
    "circle": (2, 2, 1000, 1000, 1000),
    "two-circle": (2, 2, 2000, 2000, 2000),
    "iris": (4, 3, 105, None, 45),
    "wine": (13, 3, 124, None, 54),
    "breast-cancer": (30, 2, 398, None, 171),
    "digits": (64, 10, 1257, None, 540),
}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny MLPs run fastest single-threaded (as ``reproduce`` does); restore the count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rows(x):
    return {tuple(r) for r in np.round(x, 6)}


@pytest.mark.parametrize("name", list(ds.LOADERS))
def test_dataset_shapes_classes_and_separate_draws(name):
    assert set(SHAPES) == set(ds.LOADERS)
    d, k, n_train, n_val, n_test = SHAPES[name]
    data = ds.load(name, seed=0)
    assert (data.dim, data.num_classes) == (d, k)
    assert (len(data.train), len(data.test)) == (n_train, n_test)
    assert (None if data.val is None else len(data.val)) == n_val
    for split in filter(None, (data.train, data.val, data.test)):
        assert split.x.dtype == np.float32 and split.y.dtype == np.int64
        assert np.isfinite(split.x).all()
        assert set(np.unique(split.y)) == set(range(k))  # every class in every split
    if name in ds.TABULAR:
        # A split of the whole set (iris holds duplicate rows, so rows are not compared).
        assert n_train + n_test == {"iris": 150, "wine": 178, "breast-cancer": 569, "digits": 1797}[name]
    else:
        # Separate draws: train, validation and test share no point.
        train_rows = _rows(data.train.x)
        assert not train_rows & _rows(data.test.x)
        if data.val is not None:
            assert not train_rows & _rows(data.val.x) and not _rows(data.val.x) & _rows(data.test.x)
    # Seeded: same seed, same arrays; another seed, another draw.
    again, other = ds.load(name, seed=0), ds.load(name, seed=1)
    np.testing.assert_array_equal(again.train.x, data.train.x)
    np.testing.assert_array_equal(again.test.y, data.test.y)
    assert not np.array_equal(other.train.x, data.train.x)


@pytest.mark.parametrize("name", ds.TABULAR)
def test_tabular_sets_are_stratified_and_standardised_with_train_statistics(name):
    data = ds.load(name, seed=3)
    x = data.train.x.astype(np.float64)
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    std = x.std(0)
    assert np.all((np.abs(std - 1) < 1e-4) | (std < 1e-6))  # constant features are only centred
    train_frac = np.bincount(data.train.y) / len(data.train)
    test_frac = np.bincount(data.test.y) / len(data.test)
    np.testing.assert_allclose(train_frac, test_frac, atol=0.05)


def test_synthetic_geometry():
    cube = ds.load("2d-cube", seed=0)
    x, y = cube.test.x, cube.test.y
    assert np.all(x[y == 0, 0] <= 0) and np.all(x[y == 1, 0] >= 0) and np.all(np.abs(x[:, 1]) <= 1)
    cube3 = ds.load("3d-cube", seed=0)
    signs = np.sign(cube3.train.x)
    np.testing.assert_array_equal(signs, ds.CUBE3D_CENTRES[cube3.train.y])
    grid = ds.load("grid9", seed=0)
    centred = grid.train.x - ds.GRID9_CENTRES[grid.train.y]
    np.testing.assert_allclose(centred.var(0), ds.GRID9_VARIANCE, rtol=0.05)


def test_protocols_follow_the_authors_table():
    assert PROTOCOLS["2d-cube"].hidden == (64, 128) and PROTOCOLS["2d-cube"].epochs == 40
    assert PROTOCOLS["3d-cube"].gamma == 0.8 and PROTOCOLS["3d-cube"].top2
    grid = PROTOCOLS["grid9"]
    assert (grid.optimizer, grid.lr, grid.batch_size, grid.epochs) == ("adam", 1e-3, 1000, 10)
    assert grid.hidden == (64, 128, 128) and grid.clip is None
    moon = PROTOCOLS["moon"]
    assert moon.hidden == (64, 128, 128, 128)
    assert (moon.optimizer, moon.lr, moon.momentum, moon.weight_decay, moon.clip) == ("sgd", 0.1, 0.9, 1e-4, 5.0)
    assert (moon.epochs, moon.milestones, moon.batch_size, moon.bandwidth, moon.gamma) == (100, (60, 80), 128, 0.2, 1.0)
    assert (PROTOCOLS["circle"].gamma, PROTOCOLS["circle"].bandwidth) == (0.8, 0.2)
    assert (PROTOCOLS["two-circle"].milestones, PROTOCOLS["two-circle"].bandwidth) == ((20, 50), 0.1)
    assert all(p.alpha == 1.0 for p in PROTOCOLS.values())
    assert protocol_for("iris", 105).batch_size == tabular_batch_size(105) == 14
    assert tabular_batch_size(5000) == 128
    assert with_epochs(moon, 10).milestones == (6, 8)


def _tiny(name, epochs=2):
    data = ds.load(name, seed=0)
    return data, with_epochs(protocol_for(name, len(data.train)), epochs)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "genlabel-oracle"])  # the oracle: cubes only
def test_one_tiny_run_of_each_method_works_and_is_deterministic(method):
    data, proto = _tiny("moon")
    a = train_run(data, proto, method, seed=7, keep_net=True)
    b = train_run(data, proto, method, seed=7, keep_net=True)
    assert 0.0 <= a.test_acc <= 1.0 and a.val_selected_acc is not None and 1 <= a.best_epoch <= 2
    assert (a.test_acc, a.val_selected_acc, a.best_epoch) == (b.test_acc, b.val_selected_acc, b.best_epoch)
    for pa, pb in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(pa, pb)
    c = train_run(data, proto, method, seed=8, keep_net=True)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.net.parameters(), c.net.parameters()))


@pytest.mark.parametrize("name", ["2d-cube", "3d-cube"])
def test_the_authors_oracle_is_the_true_centres_with_unit_covariance(name):
    from fastgenlabel.experiments.training import fit_class_model

    data, proto = _tiny(name)
    k, d = data.num_classes, data.dim
    model = fit_class_model("genlabel-oracle", proto, data.train.x, data.train.y, k, dataset=name)
    # The true centres: the mean of each class's (uniform, side-2) cube, here from its 10,000 test points.
    true_centres = np.stack([data.test.x[data.test.y == c].mean(0) for c in range(k)])
    np.testing.assert_allclose(model.means.numpy(), true_centres, atol=4 * np.sqrt(1 / 3 / 10_000))
    np.testing.assert_array_equal(model.means.numpy(), ds.ORACLE_CENTRES[name])
    # Covariance I: precision factor I and log-normaliser -d/2 log(2 pi), for every class.
    np.testing.assert_array_equal(model.precision_chol.numpy(), np.broadcast_to(np.eye(d), (k, d, d)))
    np.testing.assert_allclose(model.log_norm.numpy(), -0.5 * d * np.log(2 * np.pi))
    # The fitted Gaussian instead has the data's covariance, I / 3 (uniform on [-1, 1] per axis):
    # with 20 points a variance estimate has sd sqrt((1/5 - 1/9) / 20) = 0.067, 0.2 is 3 sd.
    fitted = fit_class_model("genlabel-gauss", proto, data.train.x, data.train.y, k)
    prec = fitted.precision_chol.numpy()
    cov = np.linalg.inv(prec @ prec.transpose(0, 2, 1))
    np.testing.assert_allclose(cov, np.broadcast_to(np.eye(d) / 3, (k, d, d)), atol=0.2)
    r = train_run(data, proto, "genlabel-oracle", seed=0)
    assert 0.0 <= r.test_acc <= 1.0


def test_the_oracle_is_refused_where_the_authors_have_none():
    data, proto = _tiny("iris")
    with pytest.raises(ValueError, match="genlabel-oracle"):
        train_run(data, proto, "genlabel-oracle", seed=0)


def test_top2_genlabel_run_on_the_3d_cube():
    data, proto = _tiny("3d-cube", epochs=3)
    assert proto.top2
    r = train_run(data, proto, "genlabel-gauss", seed=0)
    assert 0.0 <= r.test_acc <= 1.0 and r.val_selected_acc is None
    assert r.relabel_backend is None and r.relabel_max_diff is None  # no top-2 kernel: the reference ran


@pytest.mark.parametrize("method", ["genlabel-gauss", "genlabel-kde"])
def test_genlabel_runs_through_the_fast_relabel_kernels_checked_against_the_reference(method):
    pytest.importorskip("numba")
    from fastgenlabel.experiments.training import RELABEL_ATOL

    data, proto = _tiny("breast-cancer", epochs=1)  # d = 30: full covariance on 280 points
    r = train_run(data, proto, method, seed=0)
    assert r.relabel_backend == "numba-cpu"
    assert 0.0 <= r.relabel_max_diff <= RELABEL_ATOL
    assert train_run(data, proto, "mixup", seed=0).relabel_backend is None


def test_unknown_method_is_refused():
    data, proto = _tiny("2d-cube")
    with pytest.raises(ValueError, match="method"):
        train_run(data, proto, "cutmix", seed=0)


def _check_cell(cell, n_seeds):
    assert set(cell) >= {"mean", "std", "runs"}
    assert len(cell["runs"]) == n_seeds and all(0 <= v <= 100 for v in cell["runs"])
    assert cell["mean"] == pytest.approx(np.mean(cell["runs"]), abs=1e-3)
    assert cell["std"] == pytest.approx(np.std(cell["runs"], ddof=1) if n_seeds > 1 else 0.0, abs=1e-3)


@pytest.mark.slow
def test_cli_writes_json_with_the_documented_schema_and_a_png(tmp_path, capsys):
    out = tmp_path / "res" / "r.json"
    threads = torch.get_num_threads()
    rc = cli.main(["reproduce", "--suite", "paper", "--datasets", "2d-cube,iris", "--seeds", "2", "--seed-start", "3",
                   "--epochs", "2",
                   "--threads", "2", "--out", str(out), "--quiet", "--attack-points", "30", "--boundary-steps", "50",
                   "--pgd-steps", "5"])
    assert rc == 0
    assert torch.get_num_threads() == threads  # restored after running with 2
    printed = capsys.readouterr().out
    assert "2d-cube" in printed and "iris" in printed and "±" in printed
    assert "BoundaryAttack" in printed and "PGD-Linf" in printed
    table = json.loads(out.read_text())
    assert list(table) == ["2d-cube", "iris"]
    for name, cells in table.items():
        # The authors' oracle runs on the cubes only.
        assert list(cells) == list(METHODS if name == "2d-cube" else [m for m in METHODS if m != "genlabel-oracle"])
        data = [ds.load(name, seed) for seed in (3, 4)]
        for cell in cells.values():
            for measure in ("clean", "robust", "pgd"):
                _check_cell(cell[measure], 2)
            # PGD-Linf and the L2 attack share eps; neither can exceed the clean accuracy on the points.
            attack = cell["attack"]
            assert attack["points"] == min(30, len(data[0].test)) and attack["boundary_steps"] == 50
            assert attack["pgd_steps"] == 5 and attack["radius_fraction"] == 0.1
            np.testing.assert_allclose(attack["epsilon"], [0.1 * (d.train.x.max() - d.train.x.min()) for d in data],
                                       rtol=1e-5)
            assert cell["seeds"] == [3, 4] and "val_selected" not in cell
        assert cells["genlabel-kde"]["bandwidth"] == "scott"
        assert cells["genlabel-kde"]["class_model"] == "fitted on the training split"
    assert table["2d-cube"]["genlabel-oracle"]["class_model"].startswith("the authors' oracle")
    assert "authors' oracle" in printed
    png = out.parent / "decision_boundaries.png"  # default: next to --out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_options_override_protocol_and_plot_path(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "figs" / "b.png"
    rc = cli.main(["reproduce", "--datasets", "moon", "--methods", "mixup", "genlabel-kde", "--seeds", "1",
                   "--epochs", "1", "--gamma", "0.5", "--bandwidth", "0.3", "--out", str(out), "--plot", str(png),
                   "--quiet", "--measure", "clean"])
    assert rc == 0
    cells = json.loads(out.read_text())["moon"]
    assert list(cells) == ["mixup", "genlabel-kde"]
    assert cells["genlabel-kde"]["gamma"] == 0.5 and cells["genlabel-kde"]["bandwidth"] == 0.3
    _check_cell(cells["genlabel-kde"]["val_selected"], 1)
    _check_cell(cells["genlabel-kde"]["clean"], 1)
    assert "robust" not in cells["mixup"] and "attack" not in cells["mixup"]
    assert png.read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "decision_boundaries.png").exists()


def test_cli_no_plot_and_bad_names(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert cli.main(["reproduce", "--suite", "paper", "--datasets", "iris", "--methods", "vanilla", "--seeds", "1",
                     "--epochs", "1",
                     "--out", str(out), "--no-plot", "--quiet", "--measure", "robust", "--attack-points", "10",
                     "--boundary-steps", "20"]) == 0
    assert out.exists() and not list(tmp_path.glob("*.png"))
    cell = json.loads(out.read_text())["iris"]["vanilla"]
    assert {"robust", "pgd"} <= set(cell) and "clean" not in cell
    assert cli.main(["reproduce", "--datasets", "mnist", "--quiet"]) == 2
    assert "mnist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--gamma", "1.5"])
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--measure", "adversarial"])


def test_reproduce_refuses_an_unusable_out_before_training(tmp_path, capsys):
    import time

    from fastgenlabel.cli import main

    t = time.perf_counter()
    assert main(["reproduce", "--quick", "--out", str(tmp_path)]) == 2
    assert time.perf_counter() - t < 5 and "--out" in capsys.readouterr().err


# ---- robust accuracy -------------------------------------------------------------------------

def _linear_case(norm_of_w, ratios, eps, seed=0, d=4):
    """A 2-class linear classifier (logit difference w.x + b) and points at known margins.

    Each point sits at distance ``ratio * eps`` from the boundary, measured so that the closest
    misclassified point under the attack's norm is exactly that far: moving by t along
    -sign(w) (L-inf) changes w.x by t ||w||_1; along -w/||w||_2 (L2) by t ||w||_2.
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(size=d)
    b = 0.2
    net = torch.nn.Linear(d, 2).double()
    with torch.no_grad():
        net.weight.copy_(torch.tensor(np.stack([-w / 2, w / 2])))
        net.bias.copy_(torch.tensor([-b / 2, b / 2]))
    net = net.float()
    n = len(ratios)
    base = rng.uniform(-1, 1, size=(n, d))
    base -= ((base @ w + b) / (w @ w))[:, None] * w  # onto the boundary
    side = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    margin = np.asarray(ratios) * eps * norm_of_w(w)  # the logit difference at the wanted distance
    x = base + (side * margin / (w @ w))[:, None] * w
    y = (side > 0).astype(np.int64)
    return net, w, b, x.astype(np.float32), y


def test_attacks_give_the_closed_form_robust_accuracy_of_a_linear_classifier():
    pytest.importorskip("foolbox")
    from fastgenlabel.experiments.robustness import boundary_robust, pgd_robust

    eps = 0.4
    # Ratios well away from 1: the decision-based attack only approaches the boundary in finite steps.
    ratios = [0.25, 0.5, 1.5, 3.0] * 6
    for attack, norm in ((pgd_robust, lambda w: np.abs(w).sum()), (boundary_robust, np.linalg.norm)):
        net, w, b, x, y = _linear_case(norm, ratios, eps)
        y_flipped = y.copy()
        y_flipped[-4:] = 1 - y_flipped[-4:]  # misclassified points are never robust
        dist = np.abs(x.astype(np.float64) @ w + b) / norm(w)
        np.testing.assert_allclose(dist, np.asarray(ratios) * eps, rtol=1e-5)  # the construction
        expected = (dist > eps) & (y_flipped == y)
        assert 0 < expected.mean() < 1
        kwargs = {"pool": x} if attack is boundary_robust else {}
        bounds = (float(x.min()) - 2, float(x.max()) + 2)
        got = attack(net, x, y_flipped, eps, bounds, seed=3, **kwargs)
        np.testing.assert_array_equal(got, expected, err_msg=attack.__name__)
        # eps = 0: robust means correctly classified.
        np.testing.assert_array_equal(attack(net, x, y_flipped, 0.0, bounds, **kwargs), y_flipped == y)
    # A confident network (logits x 1e4, same boundary): the float32 cross-entropy's gradient is 0
    # there, so a PGD on it would not move; the margin's is not.
    net, w, b, x, y = _linear_case(lambda w: np.abs(w).sum(), ratios, eps)
    with torch.no_grad():
        net.weight.mul_(1e4)
        net.bias.mul_(1e4)
    dist = np.abs(x.astype(np.float64) @ w + b) / np.abs(w).sum()
    got = pgd_robust(net, x, y, eps, (float(x.min()) - 2, float(x.max()) + 2), seed=3)
    np.testing.assert_array_equal(got, dist > eps)


@pytest.mark.slow
def test_the_boundary_attack_on_several_networks_at_once_matches_one_at_a_time():
    from fastgenlabel.experiments.robustness import boundary_robust, boundary_robust_many

    data = ds.load("moon", 0)
    proto = with_epochs(protocol_for("moon", len(data.train)), 3)
    nets = [train_run(data, proto, m, 0, keep_net=True).net for m in ("vanilla", "mixup", "genlabel-kde")]
    x, y = data.test.x[:60], data.test.y[:60]
    bounds = (float(data.train.x.min()), float(data.train.x.max()))
    together = boundary_robust_many(nets, x, y, 0.37, bounds, data.train.x, steps=100, seed=5)
    alone = [boundary_robust(net, x, y, 0.37, bounds, data.train.x, steps=100, seed=5) for net in nets]
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a, b)
    assert len({a.mean() for a in alone}) > 1  # the networks differ, so the routing is exercised


def test_attack_radius_and_subset():
    from fastgenlabel.experiments.robustness import attack_radius, attack_subset

    x = np.array([[-1.0, 0.5], [3.0, 2.0]])
    assert attack_radius(x) == pytest.approx(0.1 * 4.0)
    assert attack_radius(x, fraction=0.5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="x_train"):
        attack_radius(np.array([[np.nan]]))
    np.testing.assert_array_equal(attack_subset(50, 200, seed=0), np.arange(50))
    a = attack_subset(1000, 200, seed=4)
    assert a.size == 200 and np.unique(a).size == 200 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, attack_subset(1000, 200, seed=4))
    assert not np.array_equal(a, attack_subset(1000, 200, seed=5))


# ---- the authors' tabular protocol -----------------------------------------------------------

def test_paired_outcome_against_hand_computed_t_tests():
    from fastgenlabel.experiments.tabular import paired_outcome

    base = np.array([90.0, 91.0, 92.0, 93.0, 94.0])
    # d = 1..5: t = 3 / (sqrt(2.5) / sqrt(5)) = 4.2426 with 4 df, two-sided p = 0.0132 (t tables).
    r = paired_outcome(base + [1, 2, 3, 4, 5], base)
    assert r["outcome"] == "win" and r["p"] == pytest.approx(0.0132, abs=1e-4) and r["mean_diff"] == 3.0
    assert paired_outcome(base, base + [1, 2, 3, 4, 5])["outcome"] == "loss"
    # d = +-1 alternating: mean 0.2, p = 0.70: a tie.
    assert paired_outcome(base + [1, -1, 1, -1, 1], base)["outcome"] == "tie"
    assert paired_outcome(base, base) == {"outcome": "tie", "p": 1.0, "mean_diff": 0.0}
    assert paired_outcome(base - 2, base)["outcome"] == "loss"  # constant difference: p = 0
    assert paired_outcome([90.0, 91.0], [80.0, 81.0])["p"] is None  # two pairs: no test, a tie
    with pytest.raises(ValueError, match="paired"):
        paired_outcome([1.0, 2.0], [1.0])


@pytest.mark.slow
def test_tabular_suite_end_to_end_on_iris(tmp_path, capsys):
    from fastgenlabel.experiments import tabular as tab

    out = tmp_path / "t.json"
    rc = cli.main(["reproduce", "--suite", "tabular", "--datasets", "iris", "--seeds", "3", "--epochs", "3",
                   "--attack-points", "20", "--boundary-steps", "30", "--pgd-steps", "5", "--out", str(out),
                   "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tabular protocol" in printed and "win/tie/loss" in printed and "t-test" in printed
    assert "PGD-Linf" in printed and "3fc pgd" in printed  # the margin PGD column and its tally
    table = json.loads(out.read_text())
    assert list(table) == ["iris/log-reg", "iris/3fc"]
    for cells in table.values():
        assert list(cells) == list(tab.METHODS)
        for cell in cells.values():
            for measure in ("clean", "robust", "pgd"):
                _check_cell(cell[measure], 3)
            assert cell["seeds"] == [0, 1, 2] and all(lr in tab.LRS for lr in cell["lr"]) and len(cell["lr"]) == 3
        for g, base in tab.COMPARISONS:
            for measure in ("clean", "robust", "pgd"):
                vs = cells[g]["vs"][base][measure]
                assert vs == tab.paired_outcome(cells[g][measure]["runs"], cells[base][measure]["runs"])
                assert vs["p"] is not None
    # The same cell again by hand: the learning rate is the one with the best validation accuracy.
    data = ds.with_validation(ds.load("iris", 1), tab.VAL_FRACTION, 1)
    assert len(data.val) == 21 and len(data.train) == 84 and len(data.test) == 45
    accs = [train_run(data, tab.protocol("3fc", lr, epochs=3), "mixup", 1).val_acc for lr in tab.LRS]
    assert table["iris/3fc"]["mixup"]["lr"][1] == tab.LRS[int(np.argmax(accs))]
    # A logistic regression is one linear layer.
    net = train_run(data, tab.protocol("log-reg", 0.1, epochs=1), "vanilla", 0, keep_net=True).net
    assert [type(m).__name__ for m in net] == ["Linear"]


def test_tabular_suite_refuses_a_selection_without_tabular_sets(capsys):
    assert cli.main(["reproduce", "--suite", "tabular", "--datasets", "moon", "--quiet"]) == 2
    assert "--suite tabular" in capsys.readouterr().err


def test_robust_measure_without_foolbox_is_refused_before_training(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "foolbox", None)  # makes "import foolbox" raise ImportError
    assert cli.main(["reproduce", "--datasets", "iris", "--measure", "robust", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--measure robust" in err and "fastgenlabel[robust]" in err and "--measure clean" in err


def _parse(argv):
    return cli.build_parser(("reproduce",)).parse_args(["reproduce", *argv])


def test_the_default_plan_runs_every_cell_once_digits_included():
    from fastgenlabel.experiments import tabular as tab
    from fastgenlabel.experiments.reproduce import plan

    p = plan(_parse([]))
    runs = [(kind, key[:-1], m) for kind, key, _, _ in p.tasks for m in key[-1]]
    assert len(set(runs)) == len(runs)
    paper = [r for r in runs if r[0] == "paper"]
    tabular = [r for r in runs if r[0] == "tabular"]
    # Paper suite: 20 seeds x 5 methods on each cube, 5 seeds x 4 methods on the 8 other sets;
    # one cell per (dataset, seed), its methods attacked together.
    assert len(paper) == 2 * 20 * 5 + 8 * 5 * 4 and p.n_paper == 2 * 20 + 8 * 5
    # Tabular suite: every bundled set (digits too), both architectures, 4 methods, 5 seeds.
    assert {r[1][0] for r in tabular} == set(ds.TABULAR) and "digits" in ds.TABULAR
    assert len(tabular) == len(ds.TABULAR) * len(tab.ARCHS) * len(tab.METHODS) * tab.SEEDS
    assert ("tabular", ("digits", 4, "3fc"), "genlabel-kde") in tabular
    quick = plan(_parse(["--quick"]))
    assert {key[0] for kind, key, _, _ in quick.tasks if kind == "tabular"} == {"iris"}
    # A set none of whose methods run there gets no cell.
    assert [key[0] for _, key, _, _ in plan(_parse(["--methods", "genlabel-oracle"])).tasks] == (
        ["2d-cube"] * 20 + ["3d-cube"] * 20)


@pytest.mark.slow
def test_the_lr_sweep_replays_genlabel_targets_with_the_same_result(monkeypatch):
    from fastgenlabel.experiments import tabular as tab
    from fastgenlabel.experiments import training

    data = ds.with_validation(ds.load("iris", 0), tab.VAL_FRACTION, 0)
    cache: dict = {}
    for i, lr in enumerate(tab.LRS[:3]):
        proto = tab.protocol("3fc", lr, epochs=3)
        fresh = train_run(data, proto, "genlabel-gauss", 0, keep_net=True, val_selected=False)
        if i == 1:  # the cache is filled: a replay neither fits the class model nor relabels
            monkeypatch.setattr(training, "fit_class_model", None)
            monkeypatch.setattr(training, "relabel", None)
        cached = train_run(data, proto, "genlabel-gauss", 0, keep_net=True, val_selected=False, target_cache=cache)
        monkeypatch.undo()
        for a, b in zip(fresh.net.state_dict().values(), cached.net.state_dict().values()):
            assert torch.equal(a, b)
        assert (cached.test_acc, cached.val_acc) == (fresh.test_acc, fresh.val_acc)
        assert (cached.relabel_backend, cached.relabel_max_diff) == (fresh.relabel_backend, fresh.relabel_max_diff)
    steps = -(-len(data.train) // tab.BATCH_SIZE) * 3
    assert len(cache["targets"]) == steps
    with pytest.raises(ValueError, match="target_cache"):  # another method's targets are refused
        train_run(data, tab.protocol("3fc", 0.1, epochs=3), "genlabel-kde", 0, target_cache=cache)


@pytest.mark.slow
def test_results_are_the_same_for_any_number_of_jobs(tmp_path, capsys):
    argv = ["reproduce", "--datasets", "2d-cube,digits", "--methods", "vanilla", "mixup", "genlabel-kde",
            "genlabel-oracle", "--seeds", "2", "--epochs", "2", "--archs", "log-reg", "--attack-points", "20",
            "--boundary-steps", "20", "--pgd-steps", "3"]
    outs = {}
    for jobs in ("1", "2"):
        out, png = tmp_path / f"j{jobs}.json", tmp_path / f"j{jobs}.png"
        assert cli.main(argv + ["--jobs", jobs, "--out", str(out), "--plot", str(png)]) == 0
        outs[jobs] = (out.read_text(), png.read_bytes())
        err = capsys.readouterr().err
        # cells: 2 seeds x (the cube, digits) + 2 seeds x digits / log-reg
        total = 2 * 2 + 2
        assert f"{total}/{total}" in err and "cell" in err and f"in {total} cells" in err
    assert outs["1"][0] == outs["2"][0]  # the JSON, byte for byte
    assert outs["1"][1] == outs["2"][1]  # the figure, drawn from networks trained in the workers
    table = json.loads(outs["1"][0])
    assert list(table) == ["2d-cube", "digits", "digits/log-reg"]
    assert {"clean", "robust", "pgd"} <= set(table["digits/log-reg"]["genlabel-kde"])


def test_jobs_must_be_a_positive_integer():
    for bad in ("0", "-1", "two"):
        with pytest.raises(SystemExit):
            _parse(["--jobs", bad])
