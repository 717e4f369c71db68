"""`python tools/results_table.py RUN_DIR... [--format md|csv|latex] [--out FILE]`: the results table,
mean ± std over seeds beside the reported rows (suite/results.py)."""
import sys

from suite.results import main

if __name__ == "__main__":
    sys.exit(main())
