"""`python -m membench ...`: the same as the `membench` console script (membench_entry.py: a folder named
`membench` that hides the package is named in one line, exit 2, where a plain import would end in a traceback).

The guard matters: the sweep starts its cells through multiprocessing (forkserver, or spawn on macOS), whose
processes import the main module again as `__mp_main__`; unguarded, each of them would start the CLI anew.
"""

import sys

try:
    from membench_entry import main
except ImportError:  # membench_entry sits beside the package (a checkout's top level, an install's site-packages)
    from membench.cli import main

if __name__ == "__main__":
    sys.exit(main())
