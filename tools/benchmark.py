"""`python tools/benchmark.py [--cpu] [--json FILE]`: throughput of the pretraining stack against the
compute ceiling (pretrain/benchmark.py, docs/performance.md)."""
import sys

from pretrain.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
