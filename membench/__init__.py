"""membench: measured memory/time/quality trade-offs of memory-saving training techniques.

Layout: the repository keeps conf/, techniques/ and workloads/ at its top level (the architecture shows in `ls`);
an install puts them inside this package (membench.conf, membench.techniques, membench.workloads; see
pyproject.toml's package-dir). In a checkout the same names resolve by adding the repository root to this
package's search path, so `membench.techniques.zero` is one module either way.
"""

from pathlib import Path as _Path

SCHEMA_VERSION = 2  # 2: memory by device and by phase; peak_bytes is the device peak of plain steps (CUDA)

_HERE = _Path(__file__).resolve().parent
_ROOT = _HERE.parent
if not (_HERE / "techniques").is_dir() and (_ROOT / "techniques" / "__init__.py").is_file():
    __path__.append(str(_ROOT))  # noqa: F821 - a package's module-level __path__

# The Hydra config tree: package data in an install, the top-level conf/ in a checkout.
CONF_DIR = _HERE / "conf" if (_HERE / "conf").is_dir() else _ROOT / "conf"
