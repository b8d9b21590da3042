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
import os
import re
import sys
from pathlib import Path

from membench import confpath
from membench.errors import ConfigError

CONF_DIR = confpath.main_root()  # MEMBENCH_CONF replaces it; MEMBENCH_CONF_PATH adds roots (membench/confpath.py)
_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false", "String": "a string"}


def _one_line(e: BaseException) -> str:
    text = " ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())
    return text.split(" Config search path:")[0][:400]


def _options(group: str) -> str:
    return ", ".join(confpath.options(group))


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


def _allowed(overrides: list[str], parent: str) -> list[str] | None:
    """Keys under `parent` in the config composed without the offending override (None if that fails too)."""
    from hydra import compose
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.select(compose(config_name="config", overrides=overrides), parent)
    except Exception:  # noqa: BLE001 - the list of allowed keys is a courtesy; the error is reported either way
        return None
    return sorted(k for k in node.keys() if k != "_target_") if node is not None else None


def _unknown_key(key: str, overrides: list[str]) -> ConfigError:
    """Hydra's "Could not override 'KEY'" in membench's words: which key, why, what is allowed."""
    given = next((o for o in overrides if o.lstrip("+~").split("=", 1)[0] == key), key)
    others = [o for o in overrides if o is not given]
    parent, _, leaf = key.rpartition(".")
    parts = key.split(".")
    if parts[0] == "technique" and len(parts) >= 3:
        selected = _allowed(others, "technique") or []
        if parts[1] not in selected:
            return ConfigError(
                f"{given}: technique {parts[1]} is not selected; add it (technique=[...,{parts[1]}]); "
                f"selected: {selected or '[]'}; allowed techniques: {_options('technique')}"
            )
    allowed = _allowed(others, parent) if parent else None
    why = "unknown key"
    if parts[0] == "workload" and len(parts) == 2:
        preset = _allowed(others, "workload") and _select(others, "workload.preset")
        why = f"not a knob of workload {preset}" if preset else why
    return ConfigError(f"{given}: {why}" + (f"; allowed: {', '.join(allowed)}" if allowed else ""))


def _select(overrides: list[str], key: str):
    from hydra import compose
    from omegaconf import OmegaConf

    return OmegaConf.select(compose(config_name="config", overrides=overrides), key)


def _compose(overrides: list[str]):
    from hydra import compose
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException, ValidationError

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
        m = re.search(r"Could not override '([^']+)'", str(e))
        if m:
            raise _unknown_key(m.group(1), overrides) from None
        m = re.search(r"Error merging override (\S+)", str(e))
        cause = e.__cause__
        if m and isinstance(cause, ValidationError):
            t = re.search(r"could not be converted to (\w+)", str(cause))
            if t:
                want = _TYPE_WORDS.get(t.group(1), t.group(1))
                raise ConfigError(f"{m.group(1)}: expected {want}") from None
            raise ConfigError(f"{m.group(1)}: {_one_line(cause)}") from None
        raise ConfigError(_one_line(e)) from None


def _check_inputs(cfg: dict) -> None:
    """Inputs a run would only trip over minutes later: the workload's own check_inputs (e.g. a data file)."""
    from membench.config import locate

    check = getattr(locate(cfg["workload"]["_target_"]), "check_inputs", None)
    if check is not None:
        check(cfg["workload"])
    from membench.launch.slurm import SlurmConfig

    if "slurm" in cfg:
        SlurmConfig(**cfg["slurm"])


def plan_cells(overrides: list[str], multirun: bool) -> list[tuple[dict, list[str]]]:
    """Overrides -> (fully resolved, validated config dict, the overrides that made it), one per cell.
    Nothing runs here. The configs still hold the sweep knobs (run.jobs, run.launcher, slurm)."""
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from membench.config import register_schema
    from membench.execute import build_all

    register_schema()
    cells: list[tuple[dict, list[str]]] = []
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
                _check_inputs(resolved)
                cells.append((resolved, [*list(extra), *user]))
    return cells


def plan(overrides: list[str], multirun: bool) -> list[dict]:
    """Overrides -> fully resolved, validated config dicts, one per cell (without the sweep knobs). Nothing runs."""
    from membench.launch import split_sweep

    return [c.config for c in split_sweep(plan_cells(overrides, multirun)).cells]


def cmd_run(args: argparse.Namespace) -> int:
    from membench.launch import split_sweep, update_sweep_file, write_sweep_file
    from membench.launch.progress import Display
    from membench.records import ok_hashes
    from membench.runner import clear_stale_lock

    slurm = any(o.split("=", 1)[0] == "run.launcher" and o.endswith("=slurm") for o in args.overrides)
    if not slurm and os.environ.get("MEMBENCH_START_METHOD", "auto") == "auto":
        from membench.runner import warm_up

        warm_up()  # the forkserver imports torch and the harness while the cells are planned
    sweep = split_sweep(plan_cells(args.overrides, args.multirun))
    # a cell listed twice for the same folder runs once; the same cell into two folders runs in each
    cells = list({(c.config["run"]["results_dir"], c.chash): c for c in sweep.cells}.values())
    print(f"membench: {len(cells)} run(s) planned (launcher={sweep.launcher}, jobs={sweep.jobs})", flush=True)
    done = {d: ok_hashes(d) for d in {c.config["run"]["results_dir"] for c in cells}}  # each results dir read once
    display = Display(len(cells), 1)
    todo = []
    for c in cells:
        run = c.config["run"]
        if not run["force"] and c.chash in done[run["results_dir"]]:
            display.skipped(c.label, "ok record exists; run.force=true re-runs")
            clear_stale_lock(run["results_dir"], c.chash)
        else:
            todo.append(c)
    results_dir = cells[0].config["run"]["results_dir"] if cells else "."
    sweep_file = write_sweep_file(results_dir, sweep, sys.argv[1:] if args.argv is None else args.argv)
    try:
        if not todo:
            pass
        elif sweep.launcher == "slurm":
            from membench.launch.slurm import run_slurm

            folder = Path(sweep.slurm.get("folder") or Path(results_dir) / "slurm" / sweep_file.stem)
            display.jobs = len(todo)
            try:
                run_slurm(todo, sweep.slurm, folder, display, lambda fields: update_sweep_file(sweep_file, **fields))
            except ConfigError:  # the cluster refused the array: nothing was submitted, so no sweep either
                sweep_file.unlink()
                for d in (sweep_file.parent, folder.parent):
                    if d.is_dir() and not any(d.iterdir()):
                        d.rmdir()
                raise
        else:
            from membench.launch.local import parallelism, run_local, visible_gpus

            display.jobs = parallelism(sweep.jobs, todo, visible_gpus())
            run_local(todo, sweep.jobs, display)
    finally:
        display.close()
    print("membench: done: " + ", ".join(f"{n} {s}" for s, n in sorted(display.statuses.items())), flush=True)
    if display.statuses.get("cancelled"):
        return 143  # cells cancelled in Slurm (scancel): like a SIGTERM of the sweep
    return 1 if display.failed else 0


def cmd_list(args: argparse.Namespace) -> int:
    from membench.launch.listing import listing

    print(listing(confpath.merged_view()))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from membench.launch.status import status

    return status(args.results_dir, wait=args.wait, all_sweeps=args.all)


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
        time_min_steps=args.time_min_steps,
        time_noise_floor=args.time_noise_floor,
        any_hardware=args.any_hardware,
    )
    text, code = compare(args.baseline, args.candidate, tol, args.experiment, args.format, args.confirm)
    print(text)
    return code


def cmd_history(args: argparse.Namespace) -> int:
    from membench.compare import Tolerances
    from membench.history import write_history

    if not (Path(args.results_dir) / "runs").is_dir():
        raise ConfigError(f"history: {args.results_dir!r} has no runs/ folder of records")
    tol = Tolerances(
        peak_rtol=args.peak_rtol, time_min_effect=args.time_min_effect, time_noise_floor=args.time_noise_floor
    )
    text, png = write_history(args.results_dir, args.filter, args.out, tol)
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


def _version() -> str:
    from importlib import metadata

    from membench import SCHEMA_VERSION

    try:
        v = metadata.version("membench")
    except metadata.PackageNotFoundError:
        v = "unknown (not installed)"
    return f"membench {v} (record schema {SCHEMA_VERSION})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="membench", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd", required=True)
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
    rp = sub.add_parser("report", help="print the markdown table of records and write it to a file")
    rp.add_argument("results_dir", nargs="?", default="results")
    rp.add_argument("--experiment", default=None, help="only records of this experiment")
    rp.add_argument("--out", default=None, help="file to write (default: RESULTS_DIR/REPORT[-experiment].md)")
    rp.add_argument("--plot", action="store_true", help="also draw each study's Pareto charts (PNG) into RESULTS_DIR")
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
    c.add_argument("--time-alpha", type=float, default=0.01, help="Mann-Whitney U significance level on step times")
    c.add_argument("--time-min-effect", type=float, default=0.05, help="smallest relative slowdown flagged (0: off)")
    c.add_argument("--any-hardware", action="store_true", help="compare across hardware profiles (times labelled)")
    c.add_argument("--time-min-steps", type=int, default=20, help="timed steps per side (seeds pooled) for a verdict")
    c.add_argument(
        "--time-noise-floor", type=float, default=0.0, help="run-to-run drift: shifts inside are inconclusive"
    )
    c.add_argument(
        "--confirm", action="store_true", help="re-run the candidate's regressed cells before calling them so"
    )
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
    pl = sub.add_parser("plan", help="rank technique combinations that fit run.memory_budget_mib (predicted)")
    pl.add_argument("--verify", type=int, default=None, metavar="K", help="run the top K fitting plans for real")
    pl.add_argument("overrides", nargs="*", help="workload=W run.memory_budget_mib=B [run.world_size=N] plan.*=...")
    ft = sub.add_parser("fit", help="largest batch under run.memory_budget_mib: predicted, then real runs")
    ft.add_argument("overrides", nargs="*", help="workload=W technique=[...] run.memory_budget_mib=B")
    args, extra = p.parse_known_args(argv)
    if getattr(args, "cmd", None) == "plan":  # overrides after `--verify K` (argparse ends the positionals there)
        args.overrides += [x for x in extra if not x.startswith("-")]
        extra = [x for x in extra if x.startswith("-")]
    if extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = argv
    commands = {
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
    try:
        return commands[args.cmd](args)
    except ConfigError as e:
        print(f"membench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("membench: cancelled (SIGINT)", file=sys.stderr)
        return 130
    except BaseException as e:
        from membench.launch.local import Cancelled

        if isinstance(e, Cancelled):
            print("membench: cancelled (SIGTERM)", file=sys.stderr)
            return 143
        raise


if __name__ == "__main__":
    sys.exit(main())
