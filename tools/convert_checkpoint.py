"""`python tools/convert_checkpoint.py IN OUT [--format d2|torchvision]`: a pretraining, MoCo or
torchvision checkpoint to Detectron2 (or torchvision) weights; torch + numpy only (pretrain/convert.py)."""
import sys

from pretrain.convert import main

if __name__ == "__main__":
    sys.exit(main())
