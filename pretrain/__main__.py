"""Entry point: `python -m pretrain --config configs/pretrain/NAME.yaml [key=value ...]`.

Bad input (config key, data folder) prints one line naming the fix and exits with code 2.
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
