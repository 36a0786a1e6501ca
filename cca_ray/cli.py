"""The command line every stage shares: --preset, --config, --workdir and key=value overrides."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from cca_ray.config import Config, ConfigError, available_presets, load_config

EPILOG = """\
config layers (later wins): preset YAML < --config FILE.yaml < key=value overrides.
Overrides use dotted field names, e.g.  train.lam=3  train.beta=0.05  data.source=mnist
Every field, its type and its bounds live in cca_ray/config.py; `--print-config` shows
the resolved config and exits.
"""


def stage_parser(stage: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m cca_ray.{stage}",
        description=description,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--preset",
        default="demo",
        help=f"named preset (default: demo). Available: {', '.join(available_presets())}",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file layered over the preset")
    p.add_argument("--workdir", metavar="DIR", help="where data, checkpoints and the MLflow store live (default ./cca_work)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. train.lam=3")
    return p


def parse_stage_args(
    stage: str,
    description: str,
    argv: Sequence[str] | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> tuple[Config, argparse.Namespace]:
    """Parse argv into a validated Config; a bad config prints the error and exits with code 2."""
    if not sys.stdout.isatty():  # progress bars off a terminal are \r-joined walls of text in a log file
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" bars too
    p = stage_parser(stage, description)
    if add_args is not None:
        add_args(p)
    args = p.parse_intermixed_args(argv)  # key=value may come before and after options
    try:
        cfg = load_config(args.preset, args.config, args.overrides, workdir=args.workdir)
    except ConfigError as e:
        print(f"cca_ray.{stage}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.print_config:
        from cca_ray.config import dump_config

        print(dump_config(cfg), end="")
        raise SystemExit(0)
    return cfg, args
