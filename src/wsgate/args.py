"""Argument types the subcommands share, and the error a bad flag value raises.

argparse turns an :class:`argparse.ArgumentTypeError` from these into one line
naming the flag; :class:`UsageError` is for mistakes found after parsing. The
``wsgate`` command (:mod:`wsgate.cli`) reports both in one line with exit code 2.
"""

from __future__ import annotations

import argparse

from wsgate.config import parse_duration

__all__ = ["UsageError", "count_arg", "duration_arg", "positive_arg"]


class UsageError(Exception):
    """A bad flag or argument value, reported in one line with exit code 2."""


def count_arg(text: str) -> int:
    """A whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def positive_arg(text: str) -> float:
    """A number above 0."""
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def duration_arg(text: str) -> float:
    """A duration as the config writes it (500ms, 5s, 2m) or a number of seconds."""
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
