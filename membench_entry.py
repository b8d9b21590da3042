"""The `membench` command's entry point, outside the membench package on purpose: a folder named `membench` earlier
on sys.path (PYTHONPATH, the current folder of `python -c`, a script's own folder) is imported in place of the
package, and an entry point inside the package could not even start to say so. Here the import is tried and, when
`membench` turns out to be something else, one line names the folder that hides the package (exit 2).

Two ways a folder hides it: one without __init__.py becomes a namespace package, which wins over an editable
install's finder (`pip install -e`, as `make setup` does); one with __init__.py wins over any install.
"""

from __future__ import annotations

import sys
from pathlib import Path


def hiding(module) -> str | None:
    """What the imported `membench` module is when it is not this package (None when it is)."""
    where = getattr(module, "__file__", None)
    if where is None:  # a namespace package: a folder without __init__.py
        folders = list(getattr(module, "__path__", []) or [])
        return f"the folder {folders[0] if folders else '?'} (no __init__.py)"
    if not (Path(where).parent / "cli.py").is_file():
        return f"{where}"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        from membench.cli import main as cli_main
    except ImportError:
        module = sys.modules.get("membench")
        what = hiding(module) if module is not None else None
        if what is None:
            raise  # membench is this package: the import failed inside it (a missing dependency), show it
        print(
            f"membench: error: {what} is imported as `membench` and hides the membench package; rename it, or run "
            "from another folder / take its parent off PYTHONPATH",
            file=sys.stderr,
        )
        return 2
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
