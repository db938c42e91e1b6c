"""Train a zoo model: ``python train.py --config PRESET_OR_YAML [dotted.key=value ...]``; see
:mod:`zoo.train.command` (the same command as ``zoo train``)."""

import sys

from zoo.train.command import main

if __name__ == "__main__":
    sys.exit(main())
