"""TLS: the listener's context, its certificate's facts, and reload without a drop.

A context is built whole from the certificate and key *as read at one moment*:
both files are read into memory first, and OpenSSL loads those bytes (through
memory-backed files), so a pair swapped while it is being read can never mix an
old certificate with a new key. A pair that cannot be read or parsed, or whose
key does not match its certificate, raises :class:`TlsError` with one line.

:class:`ServingCertificate` holds the context new connections use. It is
replaced, never changed: a connection takes the context current at its accept,
and a live session keeps the one it was set up with until it ends. A reload is
asked for by SIGHUP, or found by :meth:`ServingCertificate.check`, which costs
one ``stat`` per file: a Kubernetes Secret volume swaps a ``..data`` symlink,
so the watched identity of each file is its *resolved* path with its inode,
size and mtime, and any of them changing is a change. A refused pair is logged
once and the old one kept; the same refused files are not tried again until
they change again.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

from cryptography import x509

from wsgate.config import BackendTlsConfig

__all__ = [
    "ALPN",
    "CertificateFacts",
    "ServingCertificate",
    "TlsError",
    "backend_context",
    "backend_tls",
    "certificate_facts",
    "handshake_failure_reason",
    "server_context",
]

log = logging.getLogger("wsgate.tls")

ALPN = ["http/1.1"]
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(Exception):
    """A certificate, key or CA the user must fix; the message is one line."""


@dataclass(frozen=True, slots=True)
class CertificateFacts:
    """What an operator asks of a serving certificate."""

    subject: str
    issuer: str
    serial: int
    not_before: float  # unix time
    not_after: float

    def describe(self) -> str:
        from datetime import datetime

        expiry = datetime.fromtimestamp(self.not_after, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"subject {self.subject}, serial {self.serial:x}, expires {expiry}"


def certificate_facts(pem: bytes) -> CertificateFacts:
    """The facts of the first certificate in ``pem`` (the leaf of a chain)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        raise TlsError("not a PEM certificate") from None
    return CertificateFacts(
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        serial=cert.serial_number,
        not_before=cert.not_valid_before_utc.timestamp(),
        not_after=cert.not_valid_after_utc.timestamp(),
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsError(f"cannot read {what} {path}: {error.strerror}") from None


@contextlib.contextmanager
def _in_memory(data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that holds ``data`` (a memfd, gone when closed)."""
    fd = os.memfd_create("wsgate-tls", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _ssl_reason(error: ssl.SSLError) -> str:
    return (error.reason or str(error)).lower().replace("_", " ")


def server_context(
    cert: Path, key: Path, client_ca: Path | None = None, min_version: str = "1.2"
) -> tuple[ssl.SSLContext, CertificateFacts]:
    """A server context for the pair, and the facts of its certificate.

    Raises:
        TlsError: a file cannot be read or parsed, or the key does not match.
    """
    files = _read_files(cert, key, client_ca)
    return _context_of(files, cert, key, client_ca, min_version)


def _read_files(cert: Path, key: Path, client_ca: Path | None) -> tuple[bytes, bytes, bytes]:
    ca_pem = b"" if client_ca is None else _read(client_ca, "client CA")
    return _read(cert, "certificate"), _read(key, "key"), ca_pem


def _context_of(
    files: tuple[bytes, bytes, bytes],
    cert: Path,
    key: Path,
    client_ca: Path | None,
    min_version: str,
) -> tuple[ssl.SSLContext, CertificateFacts]:
    cert_pem, key_pem, ca_pem = files
    try:
        facts = certificate_facts(cert_pem)
    except TlsError:
        raise TlsError(f"certificate {cert} is not a PEM certificate") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[min_version]
    context.set_alpn_protocols(ALPN)
    with _in_memory(cert_pem) as cert_path, _in_memory(key_pem) as key_path:
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as error:
            if error.reason == "KEY_VALUES_MISMATCH":
                raise TlsError(f"key {key} does not match certificate {cert}") from None
            raise TlsError(f"cannot load {cert} with {key}: {_ssl_reason(error)}") from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cadata=ca_pem.decode("ascii", "replace"))
        except ssl.SSLError as error:
            raise TlsError(f"cannot load client CA {client_ca}: {_ssl_reason(error)}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context, facts


def backend_context(verify: bool = True, ca: Path | None = None) -> ssl.SSLContext:
    """A client context toward backends: verifying (system CAs, or ``ca``) unless told not to.

    Raises:
        TlsError: ``ca`` cannot be read or parsed.
    """
    context = ssl.create_default_context()
    context.set_alpn_protocols(ALPN)
    if ca is not None:
        pem = _read(ca, "backend CA")
        try:
            context.load_verify_locations(cadata=pem.decode("ascii", "replace"))
        except ssl.SSLError as error:
            raise TlsError(f"cannot load backend CA {ca}: {_ssl_reason(error)}") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


@functools.lru_cache(maxsize=64)
def _cached_backend_context(verify: bool, ca: Path | None) -> ssl.SSLContext:
    return backend_context(verify, ca)


def backend_tls(
    spec: BackendTlsConfig | None, host: str
) -> tuple[ssl.SSLContext | None, str | None]:
    """The context and server name to connect to a backend with (None, None: plain TCP).

    One context per (verify, ca) serves every backend that shares them.

    Raises:
        TlsError: ``spec.ca`` cannot be read or parsed.
    """
    if spec is None:
        return None, None
    return _cached_backend_context(spec.verify, spec.ca), spec.server_name or host


def handshake_failure_reason(error: BaseException) -> str:
    """A short metric label for why a server handshake failed."""
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ssl.SSLError):
        reason = (error.reason or "").lower()
        if reason == "http_request":
            return "plain_http"  # an HTTP request on the TLS port
        if reason in ("wrong_version_number", "unknown_protocol", "record_layer_failure"):
            return "not_tls"
        if reason in ("unsupported_protocol", "tlsv1_alert_protocol_version"):
            return "protocol_version"
        if reason.startswith("tlsv1_alert") or reason.startswith("sslv3_alert"):
            return "client_alert"
        if "certificate" in reason:
            return "client_certificate"
        if reason == "no_shared_cipher":
            return "no_shared_cipher"
        return "tls_error"
    if isinstance(error, ConnectionError | EOFError):
        return "closed"
    return "error"


def _identity(path: Path | None) -> tuple[object, ...] | None:
    if path is None:
        return None
    try:
        real = os.path.realpath(path)
        stat = os.stat(real)
    except OSError:
        return ("unreadable", str(path))
    return (real, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)


# A file changed this recently may change again within the same mtime tick, unseen:
# until it is older than this, each check compares contents too (git's "racy" rule).
_RACY = 2.0


class ServingCertificate:
    """The listener's current TLS context, reloaded on request or when its files change."""

    def __init__(
        self, cert: Path, key: Path, client_ca: Path | None = None, min_version: str = "1.2"
    ):
        self.cert = cert
        self.key = key
        self.client_ca = client_ca
        self.min_version = min_version
        self._seen, self._racy = self._identities()
        self._files = _read_files(cert, key, client_ca)
        self.context, self.facts = _context_of(self._files, cert, key, client_ca, min_version)
        self.reloads_total = 0
        self.reload_failures_total = 0

    def _identities(self) -> tuple[tuple[object, ...], bool]:
        paths = (self.cert, self.key, self.client_ca)
        now = time.time_ns()
        racy = False
        for path in paths:
            with contextlib.suppress(OSError):
                if path is not None and now - os.stat(path).st_mtime_ns < _RACY * 1e9:
                    racy = True
        return tuple(_identity(path) for path in paths), racy

    def check(self) -> bool:
        """Reload if a file changed since it was last read; whether a new pair is in use."""
        seen, _ = self._identities()
        if seen == self._seen and not self._racy:
            return False
        return self._reload("files changed", asked=False)

    def reload(self, why: str) -> bool:
        """Read the files again (an operator asked: ``why`` says how, e.g. SIGHUP).

        Keeps the old context, and says so once, when the new files fail.
        """
        return self._reload(why, asked=True)

    def _reload(self, why: str, *, asked: bool) -> bool:
        self._seen, self._racy = self._identities()
        try:
            files = _read_files(self.cert, self.key, self.client_ca)
        except TlsError as error:
            return self._refuse(why, error)
        if files == self._files:
            if asked:  # found by check(), a touch is not worth a line
                log.info("tls reload (%s): unchanged, serving %s", why, self.facts.describe())
            return False  # touched, not changed
        # Whatever these bytes give, they are not to be tried again until they change.
        self._files = files
        try:
            context, facts = _context_of(
                files, self.cert, self.key, self.client_ca, self.min_version
            )
        except TlsError as error:
            return self._refuse(why, error)
        self.context, self.facts = context, facts
        self.reloads_total += 1
        log.info("tls reload (%s): now serving %s", why, facts.describe())
        return True

    def _refuse(self, why: str, error: TlsError) -> bool:
        self.reload_failures_total += 1
        log.error(
            "tls reload (%s) refused: %s; still serving %s", why, error, self.facts.describe()
        )
        return False
