"""`python tools/bench.py [--out bench_output]` (`make bench`): the paper's ablation grid on the objects
corpus (suite/bench.py, docs/bench.md)."""
import sys

from suite.bench import main

if __name__ == "__main__":
    sys.exit(main())
