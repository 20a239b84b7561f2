"""``wsgate check``: validate a config and print the effective one."""

from __future__ import annotations

import argparse

import yaml

from wsgate.app.serve import add_config_arguments, config_from_args

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    print(yaml.safe_dump(config.public_dump(), sort_keys=False), end="")
    return 0
