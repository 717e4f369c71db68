"""`python tools/plot_results.py RUN_DIR... --out DIR`: pretraining curves and detection AP bars as PNG
files (suite/plots.py)."""
import sys

from suite.plots import main

if __name__ == "__main__":
    sys.exit(main())
