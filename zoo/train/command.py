"""The training command: ``python train.py --config PRESET_OR_YAML [dotted.key=value ...]`` (or ``zoo train``).

Examples::

    python train.py --config dense-tiny
    python train.py --config dense-tiny train.max_steps=50 train.data.corpus=pydoc-topics
    python train.py --config dense-tiny --print-config
    python train.py --config dense-tiny train.out_dir=runs/a train.resume=true
    python train.py --config dense-tiny train.trainer.devices=2 train.trainer.strategy=ddp
    python train.py --config deepseek-moe-1b --plan --plan-memory 80GB train.activation_checkpointing=full
"""

from __future__ import annotations

import argparse
import errno
import importlib
import signal
import sys

from zoo.errors import ConfigError
from zoo.train.config import load_config
from zoo.train.plan import parse_bytes, plan_from_config


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, and return the exit status: 0 done, 1 a non-finite
    loss or a full disk (the last checkpoint is kept), 2 a config error, 128 + signal when interrupted."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="a preset name (see zoo_configs/) or a YAML/JSON path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("--plan", action="store_true",
                        help="print the per-rank memory plan (parameters, gradients, optimizer state, activations) "
                             "without building the model, and exit")
    parser.add_argument("--plan-memory", metavar="SIZE", help="with --plan: device memory (e.g. 80GB) to find the "
                                                               "largest micro-batch for")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. model.n_layers=2")
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config, args.overrides)
        if args.print_config:
            print(config.to_yaml(), end="")
            return 0
        if args.plan or args.plan_memory:
            memory = parse_bytes(args.plan_memory) if args.plan_memory else None
            print(plan_from_config(config).report(memory))
            return 0
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        run = importlib.import_module("zoo.train.run")  # Lightning: imported only once a run starts
        try:
            result = run.train(config)
        except MisconfigurationException as err:  # a setting zoo cannot check before Lightning starts
            print(f"lightning configuration error: {err}", file=sys.stderr)
            return 2
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a non-finite loss or weights; the last good checkpoint is kept
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise
        print(f"error: {err}", file=sys.stderr)  # a full disk or a file-size limit; the last checkpoint is kept
        return 1
    if not result.interrupted:
        return 0
    return 128 + (result.stop_signal or signal.SIGINT)  # the shell's code for death by that signal: 130, 143
