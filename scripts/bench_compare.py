"""`make bench-compare`: the two latest saved pytest-benchmark runs, judged by membench compare's time verdict.

    python scripts/bench_compare.py [--storage .benchmarks] [OLD.json NEW.json] [--time-noise-floor 0.3]

Each benchmark's raw round times (saved by `--benchmark-save-data`) go through membench.compare.time_verdict,
the same one-sided Mann-Whitney U test, effect size, power threshold and noise floor as `membench compare`, so
a row is regressed, improved, inconclusive or ok, and the exit code is compare's: 0 every benchmark judged and
none regressed, 1 regressed or missing, 2 usage error, 3 nothing regressed but some inconclusive. Without
files, the two highest-numbered saves of the machine folder that holds the newest save are compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from membench.compare import EXIT_USAGE, Tolerances, compare_bench, markdown  # noqa: E402
from membench.errors import ConfigError  # noqa: E402


def latest_two(storage: Path) -> list[Path]:
    saves = sorted(storage.glob("*/[0-9][0-9][0-9][0-9]_*.json"), key=lambda p: p.stat().st_mtime)
    if not saves:
        raise ConfigError(f"bench compare: no saved run under {storage}/ (make bench saves one)")
    folder = sorted(saves[-1].parent.glob("[0-9][0-9][0-9][0-9]_*.json"))
    if len(folder) < 2:
        raise ConfigError(f"bench compare: one saved run in {folder[0].parent}; make bench-compare saves a second")
    return folder[-2:]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="*", type=Path, help="OLD.json NEW.json (default: the two latest saves)")
    ap.add_argument("--storage", type=Path, default=Path(".benchmarks"))
    ap.add_argument("--time-alpha", type=float, default=Tolerances.time_alpha)
    ap.add_argument("--time-min-effect", type=float, default=Tolerances.time_min_effect)
    ap.add_argument("--time-min-steps", type=int, default=Tolerances.time_min_steps)
    ap.add_argument("--time-noise-floor", type=float, default=Tolerances.time_noise_floor)
    a = ap.parse_args(argv)
    tol = Tolerances(
        time_alpha=a.time_alpha,
        time_min_effect=a.time_min_effect,
        time_min_steps=a.time_min_steps,
        time_noise_floor=a.time_noise_floor,
    )
    try:
        if a.files and len(a.files) != 2:
            raise ConfigError("bench compare: give two saved runs (OLD.json NEW.json) or none")
        old, new = a.files or latest_two(a.storage)
        result = compare_bench(json.loads(old.read_text()), json.loads(new.read_text()), tol)
    except ConfigError as e:
        print(f"membench: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"bench compare: {old} -> {new}\n")
    print(markdown(result))
    return result["exit_code"]


if __name__ == "__main__":
    sys.exit(main())
