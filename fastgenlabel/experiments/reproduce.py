"""``fastgenlabel reproduce``: vanilla vs mixup vs mixup + GenLabel on the paper's small sets.

Trains every (dataset, method, seed) with the authors' small-net protocol (:mod:`.protocol`) and
the tabular suite (:mod:`.tabular`), in cells of one (dataset, seed) run by ``--jobs`` worker
processes (the results do not depend on the job count). Prints tables of last-epoch test
accuracy and of robust accuracy under the authors' BoundaryAttack and PGD-Linf
(:mod:`.robustness`; mean +- std over seeds, in %), and optionally writes JSON (``--out``)
and a decision-boundary PNG of the 2-D sets (``--plot``). See docs/REPRODUCTION.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import numpy as np

from .._args import check_writable, nonnegative_int, positive_float, positive_int
from . import datasets as ds
from . import tabular
from .protocol import QUICK_DATASETS, QUICK_SEEDS, protocol_for, with_epochs
from .robustness import ATTACK_POINTS, BOUNDARY_STEPS, MEASURES, PGD_STEPS, RADIUS_FRACTION
from .training import METHOD_LABELS, METHODS, ORACLE_DATASETS, RunResult, train_run

DEFAULT_SEEDS = 5
SUITES = ("paper", "tabular", "all")
ARCH_NAMES = tuple(tabular.ARCHS)
# The cubes take seconds per run: 20 seeds by default (the authors' cube scripts average many runs).
DEFAULT_SEEDS_PER_DATASET = {"2d-cube": 20, "3d-cube": 20}
DEFAULT_PLOT_NAME = "decision_boundaries.png"
QUICK_BOUNDARY_STEPS = 300
GROUPS = {"all": tuple(ds.LOADERS), "synthetic": ds.SYNTHETIC, "tabular": ds.TABULAR}


def _names(values, allowed, groups, what):
    out = []
    for v in values:
        for name in filter(None, (s.strip() for s in v.split(","))):
            picked = groups.get(name, (name,))
            for p in picked:
                if p not in allowed:
                    raise argparse.ArgumentTypeError(
                        f"{what}: unknown name {p!r}; expected any of {', '.join(allowed)}"
                        + (f" or {', '.join(groups)}" if groups else "")
                    )
                if p not in out:
                    out.append(p)
    return out


def _bandwidth(text: str):
    if text in ("scott", "silverman"):
        return text
    try:
        return positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected 'scott', 'silverman' or a finite factor > 0, "
                                         f"got {text!r}") from None


def _unit(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a value in [0, 1], got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``reproduce`` subcommand's options."""
    parser.description = (
        "Train vanilla, mixup and mixup + GenLabel (Gaussian and KDE class models fitted on the training "
        "set) on the paper's synthetic sets and scikit-learn's tabular sets; print last-epoch test "
        "accuracy and robust accuracy (the authors' BoundaryAttack and PGD-Linf), mean +- std over seeds (%). "
        "--suite tabular adds the authors' OpenML protocol with GenLabel's win/tie/loss counts."
    )
    parser.add_argument("--datasets", nargs="+", default=None, metavar="NAME",
                        help=f"datasets (space- or comma-separated): {', '.join(ds.LOADERS)}, or the groups "
                             f"{', '.join(GROUPS)} (default: all; with --quick: {', '.join(QUICK_DATASETS)})")
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                        help=f"methods: {', '.join(METHODS)} (default: all; genlabel-oracle, the authors' "
                             f"N(true centre, I) class models, runs on {' and '.join(ORACLE_DATASETS)} only)")
    parser.add_argument("--seeds", type=positive_int, default=None, metavar="N",
                        help=f"number of seeds, run as --seed-start ... --seed-start + N - 1 "
                             f"(default {DEFAULT_SEEDS}, 20 on the cubes; with --quick {QUICK_SEEDS})")
    parser.add_argument("--seed-start", type=nonnegative_int, default=0, metavar="S", help="first seed (default 0)")
    parser.add_argument("--gamma", type=_unit, default=None,
                        help="GenLabel weight gamma in [0, 1] for every dataset (default: per dataset, "
                             "docs/REPRODUCTION.md)")
    parser.add_argument("--bandwidth", type=_bandwidth, default=None,
                        help="KDE bandwidth for every dataset: scott, silverman or a factor such as 0.2 "
                             "(scipy's bw_method; default: per dataset)")
    parser.add_argument("--kde-max-points", type=nonnegative_int, default=None, metavar="N",
                        help="keep at most N training points per class in the KDE, 0 = all "
                             "(default: per dataset; 500 on grid9, all elsewhere)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="train every dataset this many epochs, lr milestones scaled alike (default: per dataset)")
    parser.add_argument("--suite", choices=SUITES, default="all",
                        help="paper: the per-dataset protocols of the paper's figures and tables; tabular: the "
                             "authors' OpenML protocol (logistic regression and 3FC, Adam, lr chosen on validation, "
                             "win/tie/loss counts) on the tabular sets among --datasets; all (default): both")
    parser.add_argument("--archs", nargs="+", choices=ARCH_NAMES, default=None, metavar="ARCH",
                        help=f"tabular suite architectures: {', '.join(ARCH_NAMES)} (default: both; log-reg "
                             "with --quick)")
    parser.add_argument("--measure", choices=MEASURES, default="both",
                        help="clean: test accuracy; robust: accuracy under the authors' BoundaryAttack (L2) and "
                             f"under PGD-Linf, both at eps = {RADIUS_FRACTION} x the training data's range; "
                             "both (default)")
    parser.add_argument("--attack-points", type=positive_int, default=ATTACK_POINTS, metavar="N",
                        help=f"test points attacked per run, a seeded subsample (default {ATTACK_POINTS})")
    parser.add_argument("--boundary-steps", type=positive_int, default=None, metavar="N",
                        help=f"BoundaryAttack steps (default {BOUNDARY_STEPS}; {QUICK_BOUNDARY_STEPS} with --quick)")
    parser.add_argument("--pgd-steps", type=positive_int, default=PGD_STEPS, metavar="N",
                        help=f"PGD steps (default {PGD_STEPS})")
    parser.add_argument("--quick", action="store_true",
                        help=f"a small subset: {', '.join(QUICK_DATASETS)}, {QUICK_SEEDS} seeds, fewer epochs "
                             "on moon and grid9 (under two minutes on two CPU cores)")
    parser.add_argument("--out", default=None, metavar="FILE",
                        help="write results as JSON: dataset -> method -> {clean, robust, pgd} -> {mean, std, runs} "
                             "(accuracy in %%)")
    parser.add_argument("--plot", default=None, metavar="FILE",
                        help=f"decision-boundary PNG of the 2-D sets (default: {DEFAULT_PLOT_NAME} next to --out, "
                             "else in the current directory)")
    parser.add_argument("--no-plot", action="store_true", help="draw no PNG")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="torch CPU threads (default 1: the small MLPs run fastest single-threaded)")
    parser.add_argument("--jobs", type=positive_int, default=None, metavar="N",
                        help="cells trained at once, in worker processes (default: the number of usable CPUs; "
                             "the results are the same for any N)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": round(float(a.mean()), 4),
        "std": round(float(a.std(ddof=1)) if a.size > 1 else 0.0, 4),
        "runs": [round(float(v), 4) for v in a],
    }


def summarise(results: list[RunResult], protocols: dict) -> dict:
    """dataset -> method -> {"clean", "robust", "pgd", "seeds", ...}; each measure {"mean", "std", "runs"} in %.

    "clean" is present when test accuracy was measured, "robust" and "pgd" (with "attack": the
    radius per seed, the points attacked and the steps) when the attacks ran.
    """
    out: dict = {}
    for r in results:
        out.setdefault(r.dataset, {}).setdefault(r.method, []).append(r)
    table: dict = {}
    for name, per_method in out.items():
        table[name] = {}
        for method, runs in per_method.items():
            cell: dict = {}
            if all(r.test_acc is not None for r in runs):
                cell["clean"] = _summary([100 * r.test_acc for r in runs])
            if all(r.attack is not None for r in runs):
                cell["robust"] = _summary([100 * r.attack["robust"] for r in runs])
                cell["pgd"] = _summary([100 * r.attack["pgd"] for r in runs])
                a = runs[0].attack
                cell["attack"] = {"epsilon": [round(r.attack["epsilon"], 6) for r in runs], "points": a["points"],
                                  "radius_fraction": RADIUS_FRACTION, "boundary": "foolbox BoundaryAttack, L2",
                                  "boundary_steps": a["boundary_steps"], "pgd": "PGD, Linf",
                                  "pgd_steps": a["pgd_steps"]}
            cell["seeds"] = [r.seed for r in runs]
            if all(r.val_selected_acc is not None for r in runs):
                cell["val_selected"] = _summary([100 * r.val_selected_acc for r in runs])
            proto = protocols[name]
            if method.startswith("genlabel"):
                cell["gamma"] = proto.gamma
                cell["top2"] = proto.top2
                cell["class_model"] = ("the authors' oracle: N(true cube centre, I)" if method == "genlabel-oracle"
                                       else "fitted on the training split")
                backends = sorted({r.relabel_backend or "reference (top-2 label)" for r in runs})
                diffs = [r.relabel_max_diff for r in runs if r.relabel_max_diff is not None]
                cell["relabel"] = {"backend": ", ".join(backends),
                                   "first_batch_max_abs_diff": max(diffs) if diffs else None}
            if method == "genlabel-kde":
                cell["bandwidth"] = proto.bandwidth
                cell["kde_max_points"] = proto.kde_max_points
            table[name][method] = cell
    return table


def format_table(table: dict, methods: list[str], key: str = "clean") -> str:
    """Datasets x methods, 'mean ± std' in % of the measure ``key`` ("clean", "robust", "pgd", "val_selected").

    Rows where no method has ``key`` are left out; "" when none is left.
    """
    header = ["dataset"] + [METHOD_LABELS[m] for m in methods]
    rows = []
    for name, cells in table.items():
        row = [name]
        for m in methods:
            cell = cells.get(m, {}).get(key)
            row.append("-" if cell is None else f"{cell['mean']:6.2f} ± {cell['std']:5.2f}")
        if any(c != "-" for c in row[1:]):
            rows.append(row)
    if not rows:
        return ""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _seeds_text(seeds: dict[str, list[int]]) -> str:
    """'5 seed(s) 0..4' or, when datasets differ, '5 seed(s) 0..4 (2d-cube, 3d-cube: 20 seed(s) 0..19)'."""
    texts = {name: f"{len(s)} seed(s) {s[0]}..{s[-1]}" for name, s in seeds.items()}
    common = max(set(texts.values()), key=list(texts.values()).count)
    others = {}
    for name, text in texts.items():
        if text != common:
            others.setdefault(text, []).append(name)
    extra = "; ".join(f"{', '.join(names)}: {text}" for text, names in others.items())
    return common + (f" ({extra})" if extra else "")


def print_tables(table: dict, methods: list[str], seeds: dict[str, list[int]], quick: bool,
                 attacks: dict | None) -> None:
    """The measured tables on stdout, each under a title that says what it measures."""
    over = f"mean ± std over {_seeds_text(seeds)}" + (" [--quick]" if quick else "")
    titles = [("clean", f"Last-epoch test accuracy (%), {over}"),
              ("val_selected", "Validation-selected epoch, test accuracy (%) (sets with a validation split)")]
    if attacks is not None:
        n = attacks["points"]
        titles += [("robust", f"Robust accuracy (%) under the authors' BoundaryAttack (foolbox, L2, "
                              f"{attacks['boundary_steps']} steps), eps = {RADIUS_FRACTION} x training range, "
                              f"on up to {n} seeded test points per run, {over}"),
                   ("pgd", f"Robust accuracy (%) under PGD-Linf ({attacks['pgd_steps']} steps), same eps and "
                           f"points, {over}")]
    first = True
    for key, title in titles:
        text = format_table(table, methods, key=key)
        if text:
            if not first:
                print()
            print(title)
            print(text)
            first = False


def _plot_path(args) -> str | None:
    if args.no_plot:
        return None
    if args.plot:
        return args.plot
    base = os.path.dirname(os.path.abspath(args.out)) if args.out else os.getcwd()
    return os.path.join(base, DEFAULT_PLOT_NAME)


def _config(args):
    quick = bool(args.quick)
    default_names = list(QUICK_DATASETS) if quick else ["all"]
    names = _names(args.datasets or default_names, tuple(ds.LOADERS), GROUPS, "--datasets")
    methods = _names(args.methods or list(METHODS), METHODS, {}, "--methods")
    seeds = {}
    for name in names:
        n_seeds = args.seeds or (QUICK_SEEDS if quick else DEFAULT_SEEDS_PER_DATASET.get(name, DEFAULT_SEEDS))
        seeds[name] = list(range(args.seed_start, args.seed_start + n_seeds))
    return quick, names, methods, seeds


def _methods_for(name: str, methods: list[str]) -> list[str]:
    """The methods run on ``name``: the authors' oracle exists only on the cubes."""
    return [m for m in methods if m != "genlabel-oracle" or name in ORACLE_DATASETS]


def _protocol(name: str, data: ds.Dataset, overrides: dict, quick: bool):
    """The dataset's protocol with the CLI's overrides (``epochs``, ``gamma``, ``bandwidth``, ``kde_max_points``)."""
    proto = protocol_for(name, len(data.train), quick=quick)
    if overrides["epochs"] is not None:
        proto = with_epochs(proto, overrides["epochs"])
    if overrides["gamma"] is not None:
        proto = replace(proto, gamma=overrides["gamma"])
    if overrides["bandwidth"] is not None:
        proto = replace(proto, bandwidth=overrides["bandwidth"])
    if overrides["kde_max_points"] is not None:
        proto = replace(proto, kde_max_points=overrides["kde_max_points"] or None)
    return proto


def _attack(runs: list[RunResult], data: ds.Dataset, seed: int, attacks: dict | None, measure: str) -> None:
    """Fill ``r.attack`` of the runs of one seed (when attacks are measured) and drop what ``measure`` omits."""
    if attacks is not None:
        from .robustness import robust_accuracies

        x_train = data.train.x if data.val is None else np.concatenate([data.train.x, data.val.x])
        found = robust_accuracies([r.net for r in runs], x_train, data.test.x, data.test.y, seed, **attacks)
        for r, a in zip(runs, found):
            r.attack = {**a, "boundary_steps": attacks["boundary_steps"], "pgd_steps": attacks["pgd_steps"]}
    if measure == "robust":
        for r in runs:
            r.test_acc = r.val_selected_acc = None


# ---- one cell: a pure function of its arguments, run here or in a worker process -------------

def paper_cell(name: str, seed: int, methods: tuple[str, ...], *, overrides: dict, quick: bool,
               attacks: dict | None, measure: str, keep_net: bool):
    """The methods of one (dataset, seed) of the paper suite, attacked together: ([RunResult], the protocol)."""
    data = ds.load(name, seed)
    proto = _protocol(name, data, overrides, quick)
    runs = [train_run(data, proto, method, seed, keep_net=keep_net or attacks is not None) for method in methods]
    _attack(runs, data, seed, attacks, measure)
    if not keep_net:
        for r in runs:
            r.net = None
    return runs, proto


def tabular_cell(name: str, seed: int, arch: str, methods: tuple[str, ...], *, epochs: int, gamma: float,
                 bandwidth, attacks: dict | None, measure: str):
    """The methods of one (dataset, arch, seed) of the tabular suite: [(RunResult keyed "dataset/arch", rate)]."""
    data = ds.with_validation(ds.load(name, seed), tabular.VAL_FRACTION, seed)
    cells = [tabular.run_cell(data, arch, method, seed, epochs=epochs, gamma=gamma, bandwidth=bandwidth,
                              keep_net=attacks is not None) for method in methods]
    runs = [c.run for c in cells]
    _attack(runs, data, seed, attacks, measure)
    for r in runs:
        r.net, r.dataset, r.val_selected_acc = None, f"{name}/{arch}", None
    return [(c.run, c.lr) for c in cells]


# Rough relative cost of a method's run (seconds on one idle core), only to start the longest cells
# first when --jobs > 1 (longest-first keeps both workers busy until the end). Results do not depend on it.
_SLOW_PAPER = {("grid9", "genlabel-kde"): 70.0, ("digits", "genlabel-kde"): 15.0}
_PAPER_BASE = {"grid9": 8.0, "two-circle": 8.0, "moon": 4.0, "circle": 4.0, "digits": 5.0}
_TABULAR_BASE = {"digits": 10.0, "breast-cancer": 3.0}


def _cost(kind: str, key: tuple) -> float:
    if kind == "paper":
        name, _, methods = key
        return 2.0 + sum(_SLOW_PAPER.get((name, m), _PAPER_BASE.get(name, 0.5)) for m in methods)
    name, _, arch, methods = key
    base = _TABULAR_BASE.get(name, 1.5) * (2.0 if arch == "3fc" else 1.0)
    return 2.0 + sum(base * (2.0 if m.startswith("genlabel") else 1.0) for m in methods)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _init_worker(threads: int, numba_threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        import numba

        numba.set_num_threads(max(1, min(numba_threads, numba.config.NUMBA_NUM_THREADS)))
    except ImportError:
        pass


def _label(kind: str, key: tuple) -> str:
    if kind == "paper":
        return f"{key[0]} seed {key[1]}"
    return f"tabular {key[0]}/{key[2]} seed {key[1]}"


def execute(tasks: list, jobs: int, threads: int, bar) -> list:
    """Run ``tasks`` [(kind, key, fn, kwargs)] and return their results in the order of ``tasks``.

    ``jobs`` 1: one after the other in this process. More: a pool of ``jobs`` spawned worker
    processes, each with ``threads`` torch threads and the CPUs shared out among Numba's; the
    longest cells start first. Every cell seeds its own generators, so the results are the same
    whatever the number of jobs or the order in which cells finish. ``bar`` counts finished cells.
    """
    results: list = [None] * len(tasks)
    if jobs <= 1 or len(tasks) <= 1:
        for i, (kind, key, fn, kwargs) in enumerate(tasks):
            bar.set_postfix_str(_label(kind, key), refresh=False)
            results[i] = fn(*key, **kwargs)
            bar.update(1)
        return results
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    jobs = min(jobs, len(tasks))
    order = sorted(range(len(tasks)), key=lambda i: -_cost(tasks[i][0], tasks[i][1]))
    pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(threads, max(1, usable_cpus() // jobs)))
    try:
        pending = {pool.submit(tasks[i][2], *tasks[i][1], **tasks[i][3]): i for i in order}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                results[i] = fut.result()
                bar.set_postfix_str(f"done {_label(tasks[i][0], tasks[i][1])}", refresh=False)
                bar.update(1)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results


def _tabular_table(results: list[RunResult], chosen_lrs: list[float], epochs: int, gamma: float, bandwidth) -> dict:
    """The tabular suite's summary keyed "dataset/arch", with the chosen rates and the paired comparisons."""
    tab = tabular
    lrs: dict = {}
    protocols: dict = {}
    for r, lr in zip(results, chosen_lrs):
        arch = r.dataset.rsplit("/", 1)[1]
        protocols[r.dataset] = tab.protocol(arch, tab.LRS[0], epochs=epochs, gamma=gamma, bandwidth=bandwidth)
        lrs.setdefault((r.dataset, r.method), []).append(lr)
    table = summarise(results, protocols)
    for key, cells in table.items():
        for method, cell in cells.items():
            cell["lr"] = lrs[(key, method)]
            cell["lr_choice"] = (f"best last-epoch validation accuracy among {list(tab.LRS)} "
                                 f"({int(100 * tab.VAL_FRACTION)} % of the training split)")
        for g, base in tab.COMPARISONS:
            if g in cells and base in cells:
                cells[g].setdefault("vs", {})[base] = {
                    m: tab.paired_outcome(cells[g][m]["runs"], cells[base][m]["runs"])
                    for m in ("clean", "robust", "pgd") if m in cells[g] and m in cells[base]}
    return table


def print_tally(table: dict, archs: list[str], measures: list[str]) -> None:
    """GenLabel's wins / ties / losses against mixup and vanilla, per architecture and measure."""
    tab = tabular

    cols = [(a, m) for a in archs for m in measures]
    header = ["GenLabel vs"] + [f"{a} {m}" for a, m in cols]
    rows = []
    counts = {m: tab.tally(table, m) for m in measures}
    for g, base in tab.COMPARISONS:
        row = [f"{METHOD_LABELS[g]} vs {base}"]
        for a, m in cols:
            c = counts[m].get((a, g, base))
            row.append("-" if c is None else "/".join(str(c[o]) for o in tab.OUTCOMES))
        if any(c != "-" for c in row[1:]):
            rows.append(row)
    if not rows:
        return
    n = len({k.rsplit("/", 1)[0] for k in table})
    print()
    print(f"GenLabel against the baselines, tabular protocol: win/tie/loss over {n} dataset(s); two-sided "
          f"paired t-test over seeds at {tab.ALPHA}")
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    for i, r in enumerate([header] + rows):
        print(" | ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def plan(args) -> SimpleNamespace:
    """What ``run`` trains: ``tasks`` [(kind, key, fn, kwargs)], the paper suite's cells first (``n_paper``).

    Also the choices the tables and files need (names, methods, seeds, archs, attacks, ...).
    """
    tab = tabular
    quick, names, methods, seeds = _config(args)
    paper_names = names if args.suite in ("paper", "all") else []
    tab_names = [n for n in names if n in ds.TABULAR] if args.suite in ("tabular", "all") else []
    tab_methods = [m for m in methods if m in tab.METHODS]
    tab_seeds = {n: list(range(args.seed_start, args.seed_start + (args.seeds or (QUICK_SEEDS if quick else tab.SEEDS))))
                 for n in tab_names}
    # --quick: the logistic regression only, unless --archs says otherwise.
    archs = args.archs or (["log-reg"] if quick else list(ARCH_NAMES))
    plot_path = _plot_path(args) if paper_names else None
    attacks = None
    if args.measure != "clean":
        attacks = {"points": args.attack_points, "pgd_steps": args.pgd_steps,
                   "boundary_steps": args.boundary_steps or (QUICK_BOUNDARY_STEPS if quick else BOUNDARY_STEPS)}
    overrides = {"epochs": args.epochs, "gamma": args.gamma, "bandwidth": args.bandwidth,
                 "kde_max_points": args.kde_max_points}
    tab_epochs = args.epochs or tab.EPOCHS
    tab_gamma = 1.0 if args.gamma is None else args.gamma
    tab_bandwidth = args.bandwidth or "scott"
    tasks = []
    for name in paper_names:
        for seed in seeds[name]:
            # The first seed's networks of a 2-D set are kept for the decision-boundary figure.
            if not _methods_for(name, methods):
                continue
            keep = plot_path is not None and seed == seeds[name][0] and ds.load(name, seed).dim == 2
            tasks.append(("paper", (name, seed, tuple(_methods_for(name, methods))), paper_cell,
                          {"overrides": overrides, "quick": quick, "attacks": attacks, "measure": args.measure,
                           "keep_net": keep}))
    n_paper = len(tasks)
    if tab_methods:
        for name in tab_names:
            for seed in tab_seeds[name]:
                for arch in archs:
                    tasks.append(("tabular", (name, seed, arch, tuple(tab_methods)), tabular_cell,
                                  {"epochs": tab_epochs, "gamma": tab_gamma, "bandwidth": tab_bandwidth,
                                   "attacks": attacks, "measure": args.measure}))
    return SimpleNamespace(tasks=tasks, n_paper=n_paper, quick=quick, methods=methods, seeds=seeds,
                           paper_names=paper_names, tab_methods=tab_methods, tab_seeds=tab_seeds, archs=archs,
                           attacks=attacks, plot_path=plot_path, tab_epochs=tab_epochs, tab_gamma=tab_gamma,
                           tab_bandwidth=tab_bandwidth)


def run(args) -> dict:
    """Train every cell of the chosen suites; returns the summary table (see :func:`summarise`), writes the files."""
    import torch
    from tqdm import tqdm

    tab = tabular
    p = plan(args)
    tasks, n_paper, quick, methods, seeds, archs, attacks = (p.tasks, p.n_paper, p.quick, p.methods, p.seeds,
                                                             p.archs, p.attacks)
    paper_names, tab_methods, tab_seeds, plot_path = p.paper_names, p.tab_methods, p.tab_seeds, p.plot_path
    tab_epochs, tab_gamma, tab_bandwidth = p.tab_epochs, p.tab_gamma, p.tab_bandwidth
    jobs = args.jobs or usable_cpus()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        with tqdm(total=len(tasks), file=sys.stderr, disable=args.quiet, unit="cell", dynamic_ncols=True) as bar:
            done = execute(tasks, jobs, args.threads, bar)
    finally:
        torch.set_num_threads(previous_threads)
    elapsed = time.perf_counter() - start

    results = [r for runs, _ in done[:n_paper] for r in runs]
    protocols = {runs[0].dataset: proto for runs, proto in done[:n_paper]}
    panels: dict = {}
    for r in results:
        if r.net is not None:
            panels.setdefault(r.dataset, (ds.load(r.dataset, r.seed), {}))[1][r.method] = r.net
            r.net = None
    table = summarise(results, protocols) if results else {}
    tab_done = [pair for cell in done[n_paper:] for pair in cell]
    tab_results = [r for r, _ in tab_done]
    tab_table = (_tabular_table(tab_results, [lr for _, lr in tab_done], tab_epochs, tab_gamma, tab_bandwidth)
                 if tab_results else {})

    if table:
        print_tables(table, methods, {n: seeds[n] for n in paper_names}, quick, attacks)
    if tab_table:
        if table:
            print()
        print(f"== The authors' tabular protocol: {', '.join(tab.ARCH_LABELS[a] for a in archs)}; Adam, lr "
              f"chosen from {list(tab.LRS)} on a validation split, {args.epochs or tab.EPOCHS} epochs ==")
        print_tables(tab_table, tab_methods, {k: tab_seeds[k.rsplit('/', 1)[0]] for k in tab_table}, quick, attacks)
        measures = [m for m in ("clean", "robust", "pgd") if any(m in c for cells in tab_table.values()
                                                                  for c in cells.values())]
        print_tally(tab_table, archs, measures)
    table = {**table, **tab_table}
    if args.out:
        from ..models.io import write_atomically

        write_atomically(args.out, lambda f: f.write((json.dumps(table, indent=1) + "\n").encode()))
        print(f"wrote {args.out}", file=sys.stderr)
    if plot_path is not None and panels:
        from .plotting import decision_boundaries

        accs = {r.dataset: {} for r in results}
        for r in results:
            if r.seed == seeds[r.dataset][0]:
                accs[r.dataset][r.method] = r.test_acc
        os.makedirs(os.path.dirname(os.path.abspath(plot_path)), exist_ok=True)
        decision_boundaries(plot_path, panels, METHOD_LABELS, accs, seed=args.seed_start)
        print(f"wrote {plot_path}", file=sys.stderr)
    n_train = len(results) + len(tab_results) * len(tab.LRS)
    print(f"{n_train} trainings in {len(tasks)} cells in {elapsed:.1f} s ({min(jobs, max(1, len(tasks)))} job(s), "
          f"{args.threads} torch thread(s) each)", file=sys.stderr)
    return table


def main(args) -> int:
    """Entry point of ``fastgenlabel reproduce``; returns the exit code."""
    try:
        _, names, methods, _ = _config(args)
        if args.suite == "tabular" and not any(n in ds.TABULAR for n in names):
            raise ValueError(f"--suite tabular: --datasets holds none of the tabular sets {', '.join(ds.TABULAR)}")
        if args.suite == "tabular" and not any(m in tabular.METHODS for m in methods):
            raise ValueError(f"--suite tabular: --methods holds none of {', '.join(tabular.METHODS)}")
        if args.measure != "clean":
            from .robustness import import_foolbox

            try:
                import_foolbox()  # before the training runs, not after the first one
            except ImportError as e:
                raise ValueError(f"--measure {args.measure}: {e} (or use --measure clean)") from None
        for flag, path in (("--out", args.out), ("--plot", _plot_path(args))):
            if path:
                check_writable(flag, path)  # before the training runs, not after
    except (argparse.ArgumentTypeError, ValueError) as e:
        print(f"fastgenlabel reproduce: error: {e}", file=sys.stderr)
        return 2
    run(args)
    return 0
