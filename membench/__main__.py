"""`python -m membench ...`: the same as the `membench` console script.

The guard matters: the sweep starts its cells through multiprocessing (forkserver, or spawn on macOS), whose
processes import the main module again as `__mp_main__`; unguarded, each of them would start the CLI anew.
"""

import sys

from membench.cli import main

if __name__ == "__main__":
    sys.exit(main())
