"""`membench run [-m] [overrides...]`, `membench list`, `membench status RESULTS_DIR`, `membench report [results_dir]`,
`membench compare BASE NEW`.

Overrides follow Hydra's grammar. Sweeps (`-m`, e.g. `run.seed=0,1` or `technique=choice([],[bf16])`) are
expanded with Hydra's own sweeper; `+experiment=NAME` adds the experiment's cells. Every cell is composed
and validated before the first run starts; then a launcher (membench/launch/) runs each in its own child process.
Exit codes of `run`: 0 every cell ok (or already recorded ok), 1 the sweep finished but some cell is oom, error or
timeout, 2 bad input (nothing ran), 130/143 cancelled by SIGINT/SIGTERM (no process left, no record of a cancelled run).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from importlib import metadata
from pathlib import Path

from membench import SCHEMA_VERSION, confpath
from membench.compare import Tolerances, compare
from membench.errors import ConfigError
from membench.history import write_history
from membench.inputs import check_out
from membench.launch.listing import listing
from membench.launch.local import Cancelled
from membench.launch.status import status
from membench.plots import write_plots
from membench.report import write_report
from membench.runner import warm_up

# the worker's module (membench.sweep.WORKER): the forkserver imports it while the parent plans the cells
WORKER_MODULES = ("membench.execute",)


# Numeric options and what each allows: checked before any command reads a record or runs a cell.
_AT_LEAST_0 = ("peak_rtol", "flops_rtol", "quality_atol", "quality_atol_exact", "quality_rtol_other_hardware",
               "time_min_effect", "time_noise_floor", "time_min_steps", "time_min_runs", "time_load_diff", "verify")  # fmt: skip


def check_options(args: argparse.Namespace) -> None:
    for name in _AT_LEAST_0:
        value = getattr(args, name, None)
        if value is not None and (value < 0 or value != value):
            raise ConfigError(f"{args.cmd} --{name.replace('_', '-')}={value}: must be >= 0")
    alpha = getattr(args, "time_alpha", None)
    if alpha is not None and not 0 < alpha < 1:
        raise ConfigError(f"{args.cmd} --time-alpha={alpha}: must be in (0, 1)")
    alpha = getattr(args, "time_run_alpha", None)
    if alpha is not None and not 0 < alpha < 1:
        raise ConfigError(f"{args.cmd} --time-run-alpha={alpha}: must be in (0, 1)")


def cmd_run(args: argparse.Namespace) -> int:
    slurm = any(o.split("=", 1)[0] == "run.launcher" and o.endswith("=slurm") for o in args.overrides)
    if not slurm and os.environ.get("MEMBENCH_START_METHOD", "auto") == "auto":
        warm_up(WORKER_MODULES)
    from membench import sweep  # torch and the harness: after the forkserver started importing them

    return sweep.run(args.overrides, args.multirun, sys.argv[1:] if args.argv is None else args.argv)


def cmd_list(args: argparse.Namespace) -> int:
    print(listing(confpath.merged_view()))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    return status(args.results_dir, wait=args.wait, all_sweeps=args.all)


def cmd_report(args: argparse.Namespace) -> int:
    if not (Path(args.results_dir) / "runs").is_dir():
        raise ConfigError(f"report: {args.results_dir!r} has no runs/ folder of records")
    check_out("report --out", args.out or str(Path(args.results_dir) / "REPORT.md"))
    text = write_report(args.results_dir, args.out, args.experiment)
    print(text)
    if args.plot:
        for path in write_plots(args.results_dir, args.experiment):
            print(f"membench: wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    for d in (args.baseline, args.candidate):
        if not (Path(d) / "runs").is_dir():
            raise ConfigError(f"compare: {d!r} has no runs/ folder of records")
    tol = Tolerances(
        peak_rtol=args.peak_rtol,
        flops_rtol=args.flops_rtol,
        quality_atol=args.quality_atol,
        quality_atol_exact=args.quality_atol_exact,
        quality_rtol_other_hardware=args.quality_rtol_other_hardware,
        time_alpha=args.time_alpha,
        time_min_effect=args.time_min_effect,
        time_min_steps=args.time_min_steps,
        time_noise_floor=args.time_noise_floor,
        time_min_runs=args.time_min_runs,
        time_run_alpha=args.time_run_alpha,
        time_load_diff=args.time_load_diff,
        any_hardware=args.any_hardware,
    )
    rerun = None
    if args.confirm:
        from membench import sweep  # torch and the harness, only when cells are re-run

        rerun = sweep.rerun_cell
    text, code = compare(args.baseline, args.candidate, tol, args.experiment, args.format, rerun)
    print(text)
    return code


def cmd_history(args: argparse.Namespace) -> int:
    if not (Path(args.results_dir) / "runs").is_dir():
        raise ConfigError(f"history: {args.results_dir!r} has no runs/ folder of records")
    check_out("history --out", args.out or str(Path(args.results_dir) / "history.png"))
    tol = Tolerances(
        peak_rtol=args.peak_rtol, time_min_effect=args.time_min_effect, time_noise_floor=args.time_noise_floor
    )
    text, png = write_history(args.results_dir, args.filter, args.out, tol)
    print(text)
    if png:
        print(f"membench: wrote {png}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from membench.export import export  # pandas

    if args.out:
        check_out("export --out", args.out)
    df = export(args.results_dir, args.out)
    if args.out:
        print(f"membench: {len(df)} record(s), {len(df.columns)} columns -> {args.out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from membench import plan as pl  # torch
    from membench.cells import check_plan_inputs  # torch, hydra

    pc, user = pl.split_overrides(args.overrides)
    if args.verify is not None:  # through PlanConfig's own checks (plan.verify >= 0), like plan.verify=K
        pc = dataclasses.replace(pc, verify=args.verify)
    check_plan_inputs(user, pc.out)
    result = pl.plan(user, pc, progress=lambda m: print(m, file=sys.stderr, flush=True))
    if pc.verify:
        result["verified"] = pl.verify(
            result, user, pc.verify, progress=lambda m: print(m, file=sys.stderr, flush=True)
        )
    out = pc.out or str(Path(result["results_dir"]) / f"plan-{result['workload']}.json")
    print(pl.table(result, pc.top))
    if pc.verify:
        print(pl.verify_table(result["verified"]))
    print(f"membench: plan written to {pl.write_json(result, out)}")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    from membench import plan as pl  # torch
    from membench.cells import configs

    pc, user = pl.split_overrides(args.overrides)
    cfg = configs(user, False)[0]
    res = pl.fit(cfg, pc, progress=lambda m: print(m, file=sys.stderr, flush=True))
    mib = 2**20
    print(
        f"fit: predicted batch {res['predicted_batch']} ({res['predictor']}, "
        f"{res['predicted_bytes_per_sample'] / mib:.2f} MiB/sample)"
    )
    for b, m in res["runs"].items():
        print(f"  batch {b}: {m['status']}" + (f", peak {m['peak_bytes'] / mib:.1f} MiB" if m["peak_bytes"] else ""))
    if res["boundary_confirmed"]:
        print(
            f"fit: largest batch {res['batch']} under {res['budget_mib']:g} MiB: peak "
            f"{(res['peak_bytes'] or 0) / mib:.1f} MiB, {res['samples_per_s'] or 0:.1f} samples/s (measured)"
        )
    else:
        print(f"fit: boundary not confirmed within plan.fit_max_runs={pc.fit_max_runs} runs")
    return 0


def _version() -> str:
    try:
        v = metadata.version("membench")
    except metadata.PackageNotFoundError:
        v = "unknown (not installed)"
    return f"membench {v} (record schema {SCHEMA_VERSION})"


def _sweep_parsers(sub) -> None:
    r = sub.add_parser(
        "run",
        help="run one experiment, a sweep (-m) or a named study (+experiment=NAME)",
        description="Run one cell, a sweep (-m) or a study (+experiment=NAME); each cell in its own process.",
        epilog="`membench list` shows every workload, technique and run knob with its default; `membench --version` "
        "the version. Sweeps: run.jobs=auto|K cells at once; run.launcher=slurm slurm.partition=... submits to Slurm; "
        "`membench status RESULTS_DIR` shows a sweep. Exit codes: 0 all ok, 1 some cell oom/error/timeout, "
        "2 bad input, 130/143 cancelled.",
    )
    r.add_argument("-m", "--multirun", action="store_true", help="expand sweep overrides (a,b or choice(...))")
    r.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. workload=gpt_small technique=[bf16]")
    sub.add_parser("list", help="workloads with their size knobs, techniques and run knobs with their defaults")
    st = sub.add_parser("status", help="the cells of the latest sweep into RESULTS_DIR: done, running, pending")
    st.add_argument("results_dir")
    st.add_argument("--wait", action="store_true", help="follow until no cell is running or pending (re-attach)")
    st.add_argument("--all", action="store_true", help="every sweep recorded in RESULTS_DIR, not only the latest")


def _plan_parsers(sub) -> None:
    pl = sub.add_parser("plan", help="rank technique combinations that fit run.memory_budget_mib (predicted)")
    pl.add_argument("--verify", type=int, default=None, metavar="K", help="run the top K fitting plans for real")
    pl.add_argument("overrides", nargs="*", help="workload=W run.memory_budget_mib=B [run.world_size=N] plan.*=...")
    ft = sub.add_parser("fit", help="largest batch under run.memory_budget_mib: predicted, then real runs")
    ft.add_argument("overrides", nargs="*", help="workload=W technique=[...] run.memory_budget_mib=B")


def _compare_parser(sub) -> None:
    c = sub.add_parser(
        "compare",
        help="flag regressions of a candidate record set against a baseline one",
        description="Each cell is regressed, improved, inconclusive (could not be judged: too few timed steps, no "
        "step times, other hardware, a shift inside the noise floor) or ok; see docs/tracking.md.",
        epilog="exit codes: 0 every compared cell judged and none regressed; 1 a cell regressed or is missing in "
        "the candidate; 2 usage error; 3 nothing regressed, but some cells inconclusive",
    )
    c.add_argument("baseline")
    c.add_argument("candidate")
    c.add_argument("--experiment", default=None)
    c.add_argument("--format", choices=("markdown", "json"), default="markdown")
    c.add_argument("--peak-rtol", type=float, default=0.01, help="allowed relative growth of the peak")
    c.add_argument("--flops-rtol", type=float, default=0.01, help="allowed relative growth of counted FLOPs")
    c.add_argument(
        "--quality-atol", type=float, default=0.01, help="approximate techniques, one seed: allowed worsening"
    )
    c.add_argument(
        "--quality-atol-exact", type=float, default=0.0, help="exact techniques: allowed change (0: identical)"
    )
    c.add_argument(
        "--quality-rtol-other-hardware",
        type=float,
        default=1e-6,
        help="exact techniques across hardware profiles (--any-hardware): allowed relative change (fp32 rounding)",
    )
    c.add_argument("--time-alpha", type=float, default=0.01, help="Mann-Whitney U significance level on step times")
    c.add_argument("--time-min-effect", type=float, default=0.05, help="smallest relative slowdown flagged (0: off)")
    c.add_argument("--any-hardware", action="store_true", help="compare across hardware profiles (times labelled)")
    c.add_argument("--time-min-steps", type=int, default=20, help="timed steps per side (seeds pooled) for a verdict")
    c.add_argument(
        "--time-min-runs", type=int, default=5, help="runs (seeds) per side from which the verdict is on runs (Welch)"
    )
    c.add_argument("--time-run-alpha", type=float, default=0.05, help="Welch significance level on run medians")
    c.add_argument(
        "--time-load-diff",
        type=float,
        default=1.0,
        help="1-min load difference (cores) between the sides beyond which times are not judged (0: off)",
    )
    c.add_argument(
        "--time-noise-floor", type=float, default=0.0, help="run-to-run drift: shifts inside are inconclusive"
    )
    c.add_argument(
        "--confirm", action="store_true", help="re-run the candidate's regressed cells before calling them so"
    )


def _records_parsers(sub) -> None:
    rp = sub.add_parser("report", help="print the markdown table of records and write it to a file")
    rp.add_argument("results_dir", nargs="?", default="results")
    rp.add_argument("--experiment", default=None, help="only records of this experiment")
    rp.add_argument("--out", default=None, help="file to write (default: RESULTS_DIR/REPORT[-experiment].md)")
    rp.add_argument("--plot", action="store_true", help="also draw each study's Pareto charts (PNG) into RESULTS_DIR")
    _compare_parser(sub)
    h = sub.add_parser("history", help="trend of peak, step time and quality over commits (table + PNG)")
    h.add_argument("results_dir")
    h.add_argument("filter", nargs="?", default=None, help="substring of 'workload techniques', e.g. gpt_tiny")
    h.add_argument("--out", default=None, help="PNG to write (default: RESULTS_DIR/history.png)")
    h.add_argument("--peak-rtol", type=float, default=0.01, help="change point: smallest relative peak step")
    h.add_argument("--time-min-effect", type=float, default=0.05, help="change point: smallest relative step-time step")
    h.add_argument(
        "--time-noise-floor", type=float, default=0.0, help="run-to-run drift: step-time steps inside ignored"
    )
    e = sub.add_parser("export", help="every record as one row of a flat table (CSV or Parquet, via pandas)")
    e.add_argument("results_dir")
    e.add_argument("--out", default=None, help="FILE.csv or FILE.parquet (default: CSV on stdout)")


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit 2), like every other input error; -h shows the usage."""

    def error(self, message: str):
        self.exit(2, f"membench: error: {self.prog}: {message} (see {self.prog} -h)\n")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="membench", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", required=True)
    _sweep_parsers(sub)
    _records_parsers(sub)
    _plan_parsers(sub)
    return p


COMMANDS = {
    "run": cmd_run,
    "list": cmd_list,
    "status": cmd_status,
    "plan": cmd_plan,
    "fit": cmd_fit,
    "report": cmd_report,
    "compare": cmd_compare,
    "history": cmd_history,
    "export": cmd_export,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if getattr(args, "cmd", None) == "plan":  # overrides after `--verify K` (argparse ends the positionals there)
        args.overrides += [x for x in extra if not x.startswith("-")]
        extra = [x for x in extra if x.startswith("-")]
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        check_options(args)
        return COMMANDS[args.cmd](args)
    except ConfigError as e:
        print(f"membench: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a path the checks above did not foresee: one line, not a traceback
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"membench: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("membench: cancelled (SIGINT)", file=sys.stderr)
        return 130
    except Cancelled:
        print("membench: cancelled (SIGTERM)", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
