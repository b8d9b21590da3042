"""Checks of the paths a command will write, made before it runs anything or writes a byte (exit 2, one line).

Light on purpose (no torch, no Hydra): the CLI's record commands (report, history, export) use it too.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from membench.errors import ConfigError


def check_writable(key: str, folder: str, value: str | None = None) -> None:
    """`folder` can be created (or is) a directory this process may write into. Nothing is left behind: the probe
    is an anonymous temporary file in the nearest existing folder (os.access alone says yes to root on a read-only
    mount). `value`: what the user gave for `key`, when `folder` is derived from it (an output file's folder)."""
    p = Path(folder).expanduser()
    shown = f"{key}={value if value is not None else folder}"
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{shown}: {folder} is a file, not a directory; allowed: a writable directory")
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{shown}: {probe} is a file, not a directory; allowed: a writable directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        where = "" if probe == p else f" ({probe} would hold it)"
        raise ConfigError(f"{shown}: not writable{where}: {e.strerror}; allowed: a writable directory") from None


def check_out(key: str, path: str) -> None:
    """An output file the command will write: not a folder, in a folder it can create or write."""
    if Path(path).is_dir():
        raise ConfigError(f"{key}={path}: a directory; allowed: a file path in a writable directory")
    check_writable(key, str(Path(path).parent), path)
