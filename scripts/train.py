"""Thin equivalent of ``lcjax train``: ``python scripts/train.py --config configs/demo.yaml``."""

import sys

from lcjax.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
