"""`membench run [-m] [overrides...]`, `membench report [results_dir]`, `membench compare BASE NEW`.

Overrides follow Hydra's grammar. Sweeps (`-m`, e.g. `run.seed=0,1` or `technique=choice([],[bf16])`) are
expanded with Hydra's own sweeper; `+experiment=NAME` adds the experiment's cells. Every cell is composed
and validated before the first run starts; then each runs in its own child process (membench/runner.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from membench.errors import ConfigError

CONF_DIR = Path(os.environ.get("MEMBENCH_CONF", Path(__file__).resolve().parent.parent / "conf"))


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text.split(" Config search path:")[0][:400]


def _options(group: str) -> str:
    return ", ".join(sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml")))


def _expand(overrides: list[str], multirun: bool) -> list[list[str]]:
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"bad override: {_one_line(e)}") from None
    sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        raise ConfigError(f"{sweeps[0]}: a sweep needs -m/--multirun")
    return [cell for batch in BasicSweeper.split_arguments(parsed, None) for cell in batch]


def _compose(overrides: list[str]):
    from hydra import compose
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return compose(config_name="config", overrides=overrides)
    except MissingConfigException as e:
        for group in ("workload", "technique", "experiment"):
            for o in overrides:
                key = o.lstrip("+~").split("=", 1)[0]
                if key == group and f"'{group}/" in str(e):
                    name = str(e).split(f"'{group}/", 1)[1].split("'", 1)[0]
                    raise ConfigError(f"{group}={name}: unknown; allowed: {_options(group)}") from None
        raise ConfigError(_one_line(e)) from None
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from None


def plan(overrides: list[str], multirun: bool) -> list[dict]:
    """Overrides -> fully resolved, validated config dicts, one per cell. Nothing runs here."""
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from membench.config import register_schema
    from membench.execute import build_all

    register_schema()
    cells: list[dict] = []
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for user in _expand(overrides, multirun):
            base = _compose(user)
            exp_cells = list(base.get("experiment", {}).get("cells", []) or []) or [[]]
            for extra in exp_cells:
                # experiment cell first, the user's overrides last so they win (e.g. run.train_steps=...)
                cfg = _compose([*list(extra), *user]) if extra else base
                try:
                    resolved = OmegaConf.to_container(cfg, resolve=True)
                except OmegaConfBaseException as e:
                    raise ConfigError(_one_line(e)) from None
                build_all(resolved)
                cells.append(resolved)
    return cells


def cmd_run(args: argparse.Namespace) -> int:
    from membench.records import config_hash, ok_hashes
    from membench.report import summary_line
    from membench.runner import run_cell

    cells = plan(args.overrides, args.multirun)
    print(f"membench: {len(cells)} run(s) planned", flush=True)
    counts: dict[str, int] = {}
    done = {d: ok_hashes(d) for d in {c["run"]["results_dir"] for c in cells}}  # read each results dir once
    for i, cfg in enumerate(cells, 1):
        run = cfg["run"]
        label = f"[{i}/{len(cells)}] {cfg['workload']['preset']} technique={list(cfg.get('technique') or {})}"
        if not run["force"] and config_hash(cfg) in done[run["results_dir"]]:
            print(f"{label}: skipped (ok record exists; run.force=true re-runs)", flush=True)
            counts["skipped"] = counts.get("skipped", 0) + 1
            continue
        print(f"{label}: running", flush=True)
        record = run_cell(cfg, run["results_dir"], run["timeout_s"])
        counts[record["status"]] = counts.get(record["status"], 0) + 1
        print(f"{label}: {summary_line(record)}", flush=True)
    # Failed runs are results, not a failed sweep: the exit code stays 0 once every cell has a record.
    print("membench: done: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), flush=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from membench.report import write_report

    if not (Path(args.results_dir) / "runs").is_dir():
        raise ConfigError(f"report: {args.results_dir!r} has no runs/ folder of records")
    text = write_report(args.results_dir, args.out, args.experiment)
    print(text)
    if args.plot:
        from membench.plots import write_plots

        for path in write_plots(args.results_dir, args.experiment):
            print(f"membench: wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from membench.compare import Tolerances, compare

    for d in (args.baseline, args.candidate):
        if not (Path(d) / "runs").is_dir():
            raise ConfigError(f"compare: {d!r} has no runs/ folder of records")
    tol = Tolerances(
        peak_rtol=args.peak_rtol,
        flops_rtol=args.flops_rtol,
        quality_atol=args.quality_atol,
        quality_atol_exact=args.quality_atol_exact,
        time_alpha=args.time_alpha,
        time_min_effect=args.time_min_effect,
        any_hardware=args.any_hardware,
    )
    text, code = compare(args.baseline, args.candidate, tol, args.experiment, args.format)
    print(text)
    return code


def cmd_history(args: argparse.Namespace) -> int:
    from membench.history import write_history

    if not (Path(args.results_dir) / "runs").is_dir():
        raise ConfigError(f"history: {args.results_dir!r} has no runs/ folder of records")
    text, png = write_history(args.results_dir, args.filter, args.out)
    print(text)
    if png:
        print(f"membench: wrote {png}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from membench.export import export

    df = export(args.results_dir, args.out)
    if args.out:
        print(f"membench: {len(df)} record(s), {len(df.columns)} columns -> {args.out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from membench import plan as pl

    pc, user = pl.split_overrides(args.overrides)
    if args.verify is not None:
        pc.verify = args.verify
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
    from membench import plan as pl

    pc, user = pl.split_overrides(args.overrides)
    cfg = plan(user, False)[0]
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="membench", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run one experiment, a sweep (-m) or a named study (+experiment=NAME)")
    r.add_argument("-m", "--multirun", action="store_true", help="expand sweep overrides (a,b or choice(...))")
    r.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. workload=gpt_small technique=[bf16]")
    rp = sub.add_parser("report", help="print the markdown table of records and write it to a file")
    rp.add_argument("results_dir", nargs="?", default="results")
    rp.add_argument("--experiment", default=None, help="only records of this experiment")
    rp.add_argument("--out", default=None, help="file to write (default: RESULTS_DIR/REPORT[-experiment].md)")
    rp.add_argument("--plot", action="store_true", help="also draw each study's Pareto charts (PNG) into RESULTS_DIR")
    c = sub.add_parser("compare", help="flag regressions of a candidate record set against a baseline one")
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
    c.add_argument("--time-alpha", type=float, default=0.01, help="Mann-Whitney U significance level on step times")
    c.add_argument("--time-min-effect", type=float, default=0.05, help="smallest relative slowdown flagged (0: off)")
    c.add_argument("--any-hardware", action="store_true", help="compare across hardware profiles (times labelled)")
    h = sub.add_parser("history", help="trend of peak, step time and quality over commits (table + PNG)")
    h.add_argument("results_dir")
    h.add_argument("filter", nargs="?", default=None, help="substring of 'workload techniques', e.g. gpt_tiny")
    h.add_argument("--out", default=None, help="PNG to write (default: RESULTS_DIR/history.png)")
    e = sub.add_parser("export", help="every record as one row of a flat table (CSV or Parquet, via pandas)")
    e.add_argument("results_dir")
    e.add_argument("--out", default=None, help="FILE.csv or FILE.parquet (default: CSV on stdout)")
    pl = sub.add_parser("plan", help="rank technique combinations that fit run.memory_budget_mib (predicted)")
    pl.add_argument("--verify", type=int, default=None, metavar="K", help="run the top K fitting plans for real")
    pl.add_argument("overrides", nargs="*", help="workload=W run.memory_budget_mib=B [run.world_size=N] plan.*=...")
    ft = sub.add_parser("fit", help="largest batch under run.memory_budget_mib: predicted, then real runs")
    ft.add_argument("overrides", nargs="*", help="workload=W technique=[...] run.memory_budget_mib=B")
    args = p.parse_args(argv)
    try:
        commands = {
            "plan": cmd_plan,
            "fit": cmd_fit,
            "run": cmd_run,
            "report": cmd_report,
            "compare": cmd_compare,
            "history": cmd_history,
            "export": cmd_export,
        }
        return commands[args.cmd](args)
    except ConfigError as e:
        print(f"membench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
