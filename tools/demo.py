"""`python tools/demo.py [--out demo_output]` (`make demo`): the whole suite on a generated corpus, on
CPU, in minutes (suite/demo.py)."""
import sys

from suite.demo import main

if __name__ == "__main__":
    sys.exit(main())
