"""Entry point: `python -m pretrain --config configs/pretrain/NAME.yaml [key=value ...]`.

Bad input (config key or value, data folder, an output_dir holding another run, a damaged or
unsafe checkpoint, an unwritable output_dir) prints one line naming the fix and exits with code 2;
so does a run whose loss or weights go NaN/Inf (the line names the iteration and the checkpoint kept).
"""
import argparse
import sys

from pretrain.utils import UserError


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file under configs/pretrain/")
    parser.add_argument("overrides", nargs="*", help="dotted key=value, e.g. data.root=DIR epochs=10")
    args = parser.parse_args(argv)
    from pretrain.config import load_config
    from pretrain.engine import train

    try:
        cfg = load_config(args.config, args.overrides)
        train(cfg)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
