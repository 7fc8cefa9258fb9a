"""The paper's Table 1 and ablations on a lab task: a thin wrapper over `duetlm lab tables`.

    python benchmarks/lab_tables.py --task mix --seeds 0,1,2 --jobs 2 --output docs/results/mix

Every option is `duetlm lab tables`'s (`duetlm lab tables --help`); the grid, its cache and the
reports live in `duetlm.lab.grid`, `duetlm.lab.units` and `duetlm.lab.tables`.
"""

from __future__ import annotations

import sys

from duetlm.cli import app

if __name__ == "__main__":
    sys.exit(app(["lab", "tables", *sys.argv[1:]]))
