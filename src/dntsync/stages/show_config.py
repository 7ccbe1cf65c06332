"""Print the validated configuration (after overlays and overrides) as YAML."""

from __future__ import annotations

from dntsync.config import Config, dump_config


def run(cfg: Config, args) -> int:
    print(dump_config(cfg), end="")
    return 0
