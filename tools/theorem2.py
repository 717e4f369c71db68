"""`python tools/theorem2.py [--plot PNG] [--json FILE]`: Theorem 2's exact label recovery on synthetic
clusters (suite/theorem2.py, docs/theorem2.md)."""
import sys

from suite.theorem2 import main

if __name__ == "__main__":
    sys.exit(main())
