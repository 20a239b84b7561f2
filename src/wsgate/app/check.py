"""``wsgate check``: validate a config and print the effective one.

With ``tls``, the pair is loaded as the listener would load it: a key that does
not match its certificate, or a file that cannot be read, is an error, and the
certificate's subject and expiry are printed (as a YAML comment, so the output
stays a config).
"""

from __future__ import annotations

import argparse

import yaml

from wsgate.app.serve import add_config_arguments, config_from_args
from wsgate.config import Config, ConfigError
from wsgate.edge.tls import TlsError, backend_context, server_context

__all__ = ["add_arguments", "check_tls", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def check_tls(config: Config) -> list[str]:
    """Load every TLS file the config names; one line per serving certificate.

    Raises:
        ConfigError: a pair or CA the gateway could not use.
    """
    lines: list[str] = []
    try:
        if config.tls is not None:
            tls = config.tls
            _, facts = server_context(tls.cert, tls.key, tls.client_ca, tls.min_version)
            lines.append(f"tls: {facts.describe()}")
        backends = config.backends if isinstance(config.backends, list) else []
        for spec in [config.backend_tls, *(b.tls for b in backends)]:
            if spec is not None:
                backend_context(spec.verify, spec.ca)
    except TlsError as error:
        raise ConfigError(f"tls: {error}") from None
    return lines


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    notes = check_tls(config)
    print(yaml.safe_dump(config.public_dump(), sort_keys=False), end="")
    for note in notes:
        print(f"# {note}")
    return 0
