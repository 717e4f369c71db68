"""`python tools/make_synthetic_data.py --out DIR [--preset scenes|objects] ...`: the seeded synthetic
corpus in the ImageFolder, VOC and COCO layouts (suite/corpus.py)."""
import sys

from suite.corpus import main

if __name__ == "__main__":
    sys.exit(main())
