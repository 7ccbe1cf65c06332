"""`dntsync <command>`: one command per pipeline stage.

Every command reads `conf/params.yaml` (or `--params FILE`), overlays `--config FILE`s and
dotted `--set key=value` overrides, and validates the result before doing any work.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dntsync.config import ConfigError, load_config
from dntsync.console import quiet_libraries
from dntsync.errors import RunError, UserError

# command -> stage module; each module has `run(cfg, args)` and may have `add_arguments(parser)`.
COMMANDS = {
    "generate": "dntsync.stages.generate",
    "show-config": "dntsync.stages.show_config",
    "train-twin": "dntsync.stages.train_twin",
    "train-marl": "dntsync.stages.train_marl",
    "tune": "dntsync.stages.tune",
    "train-learners": "dntsync.stages.train_learners",
    "sweep": "dntsync.stages.sweep",
    "episode-trace": "dntsync.stages.episode_trace",
    "figures": "dntsync.stages.figures",
    "report": "dntsync.stages.report",
    "pipeline": "dntsync.stages.pipeline",
    "diagnose-learner": "dntsync.stages.diagnose",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen command's module is imported (torch loads only when needed)."""
    parser = argparse.ArgumentParser(prog="dntsync", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help=", ".join(COMMANDS))
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name) if name == command else None
        doc = (module.__doc__ or "").strip().splitlines() if module else []
        p = sub.add_parser(name, help=doc[0] if doc else None,
                           description=module.__doc__ if module else None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("--params", default="conf/params.yaml", help="base parameter file")
        p.add_argument("--config", action="append", default=[], metavar="FILE",
                       help="extra YAML overlay (e.g. a tuned-params file); repeatable")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="dotted override, e.g. --set scenario.n_users=20; repeatable")
        if module is not None and hasattr(module, "add_arguments"):
            module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        cfg = load_config(args.params, args.overrides, args.config)
    except ConfigError as err:
        print(f"dntsync {args.command}: bad configuration: {err}", file=sys.stderr)
        return 2
    try:
        result = args._module.run(cfg, args)
    except UserError as err:
        print(f"dntsync {args.command}: {err}", file=sys.stderr)
        return 2
    except (RunError, OSError) as err:  # OSError: e.g. a full disk (the last good files stay)
        print(f"dntsync {args.command}: failed: {err}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
