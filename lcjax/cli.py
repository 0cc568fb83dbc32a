"""Command line: ``lcjax train --config FILE [--set key=value]... [--run-dir DIR] [--resume]``.

Errors in anything the user typed or pointed at print one line on stderr naming the field and the rule
and exit with code 2, before anything is written. Simulated CPU devices for the mesh are provisioned
before JAX is imported, so every mesh runs on a machine without accelerators.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

from lcjax import config as config_lib
from lcjax.sharding.mesh import provision_host_devices

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"lcjax: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def build_parser() -> argparse.ArgumentParser:
    """The ``lcjax`` argument parser."""
    parser = _Parser(prog="lcjax", description="Long-context LLaMA training on sharded device meshes.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a model (see configs/demo.yaml)")
    train.add_argument("--config", required=True, help="YAML config file")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set model.n_layers=2 (repeatable)")
    train.add_argument("--run-dir", help="run directory (default runs/<config name>-<UTC time>)")
    train.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --run-dir")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def default_run_dir(cfg: config_lib.Config) -> Path:
    """runs/<config name>-<UTC time>."""
    return Path("runs") / f"{cfg.name}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def _train(args) -> int:
    cfg = config_lib.load(args.config, args.set)
    if args.resume and not args.run_dir:
        raise ValueError("--resume needs --run-dir")
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    provision_host_devices(cfg.mesh.data * cfg.mesh.sequence * cfg.mesh.model)
    from lcjax.train.loop import train  # imports JAX: after the devices are provisioned

    result = train(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
    print(f"lcjax: step {result['step']} loss {result['loss']} — run dir {run_dir}, "
          f"checkpoint {result['checkpoint']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lcjax`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return {"train": _train}[args.command](args)
    except ValueError as e:
        return _fail(str(e).splitlines()[0] if str(e) else type(e).__name__)


if __name__ == "__main__":
    sys.exit(main())
