"""The listener's TLS context, its certificate's facts, and reload (handshakes in memory)."""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
from pathlib import Path

import pytest
from cryptography import x509

from wsgate.edge.tls import (
    ServingCertificate,
    TlsError,
    backend_context,
    handshake_failure_reason,
    server_context,
)
from wsgate.testbed.certs import IssuedPair, TestCA


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> x509.Certificate:
    """A whole handshake through memory BIOs; the certificate the client was shown."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client_side = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    server_side = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client_side, server_side):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        try:
            client_side.do_handshake()
            server_side.do_handshake()
            break
        except ssl.SSLWantReadError:
            continue
    assert client_side.selected_alpn_protocol() == "http/1.1"
    der = client_side.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def client_for(ca: TestCA) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca.pem.decode())
    context.set_alpn_protocols(["http/1.1"])
    return context


class TestServerContext:
    def test_a_good_pair_serves_its_certificate(self, ca: TestCA, tmp_path: Path) -> None:
        pair = ca.issue(tmp_path)
        context, facts = server_context(pair.cert, pair.key)
        assert facts.serial == pair.serial
        assert facts.subject == "CN=localhost"
        assert "expires" in facts.describe()
        assert handshake(context, client_for(ca)).serial_number == pair.serial

    def test_mismatched_pair_refused_in_one_line(self, ca: TestCA, tmp_path: Path) -> None:
        one, other = ca.issue(tmp_path, "one"), ca.issue(tmp_path, "other")
        with pytest.raises(TlsError, match="does not match") as caught:
            server_context(one.cert, other.key)
        assert "\n" not in str(caught.value)

    def test_unreadable_and_unparsable_files(self, ca: TestCA, tmp_path: Path) -> None:
        pair = ca.issue(tmp_path)
        with pytest.raises(TlsError, match="cannot read certificate"):
            server_context(tmp_path / "missing.crt", pair.key)
        garbage = tmp_path / "garbage.pem"
        garbage.write_bytes(b"not pem")
        with pytest.raises(TlsError, match="not a PEM certificate"):
            server_context(garbage, pair.key)
        with pytest.raises(TlsError, match="cannot load"):
            server_context(pair.cert, garbage)

    def test_min_version_is_kept(self, ca: TestCA, tmp_path: Path) -> None:
        pair = ca.issue(tmp_path)
        context, _ = server_context(pair.cert, pair.key, min_version="1.3")
        assert context.minimum_version is ssl.TLSVersion.TLSv1_3

    def test_client_ca_requires_a_client_certificate(self, ca: TestCA, tmp_path: Path) -> None:
        pair = ca.issue(tmp_path)
        context, _ = server_context(pair.cert, pair.key, client_ca=ca.write(tmp_path / "ca.pem"))
        assert context.verify_mode is ssl.CERT_REQUIRED


class TestBackendContext:
    def test_verifies_by_default(self, ca: TestCA, tmp_path: Path) -> None:
        context = backend_context(ca=ca.write(tmp_path / "ca.pem"))
        assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
        pair = ca.issue(tmp_path)
        server, _ = server_context(pair.cert, pair.key)
        assert handshake(server, context).serial_number == pair.serial

    def test_verification_can_be_turned_off(self) -> None:
        context = backend_context(verify=False)
        assert context.verify_mode is ssl.CERT_NONE and not context.check_hostname


def swap_data_link(volume: Path, pair: IssuedPair, name: str) -> None:
    """What the kubelet does to a Secret volume: a new directory, ..data relinked at once."""
    target = volume / name
    target.mkdir()
    (target / "tls.crt").write_bytes(pair.cert.read_bytes())
    (target / "tls.key").write_bytes(pair.key.read_bytes())
    link = volume / "..data_tmp"
    link.symlink_to(name)
    os.replace(link, volume / "..data")


class TestReload:
    def test_secret_volume_swap_is_seen_and_served(self, ca: TestCA, tmp_path: Path) -> None:
        volume = tmp_path / "secret"
        volume.mkdir()
        first, second = ca.issue(tmp_path, "first"), ca.issue(tmp_path, "second")
        swap_data_link(volume, first, "..2026_01")
        for name in ("tls.crt", "tls.key"):
            (volume / name).symlink_to(f"..data/{name}")
        serving = ServingCertificate(volume / "tls.crt", volume / "tls.key")
        old_context = serving.context
        assert not serving.check()
        swap_data_link(volume, second, "..2026_02")
        assert serving.check()
        assert serving.facts.serial == second.serial
        assert handshake(serving.context, client_for(ca)).serial_number == second.serial
        # The context of connections set up before is left as it was.
        assert handshake(old_context, client_for(ca)).serial_number == first.serial
        assert serving.reloads_total == 1

    def test_mismatched_pair_refused_once_and_old_kept(
        self, ca: TestCA, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        good, other = ca.issue(tmp_path / "good"), ca.issue(tmp_path / "other")
        cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
        cert.write_bytes(good.cert.read_bytes())
        key.write_bytes(good.key.read_bytes())
        serving = ServingCertificate(cert, key)
        key.write_bytes(other.key.read_bytes())  # a rotation that wrote only half its pair
        with caplog.at_level(logging.ERROR, "wsgate.tls"):
            assert not serving.check()
            assert not serving.check()  # the same bad files are not tried (nor logged) again
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1 and "does not match" in refusals[0].getMessage()
        assert "\n" not in refusals[0].getMessage()
        assert serving.facts.serial == good.serial
        assert handshake(serving.context, client_for(ca)).serial_number == good.serial
        cert.write_bytes(other.cert.read_bytes())  # the other half arrives
        assert serving.check() and serving.facts.serial == other.serial
        assert (serving.reloads_total, serving.reload_failures_total) == (1, 1)

    def test_forced_reload_of_deleted_files_keeps_the_old(self, ca: TestCA, tmp_path: Path) -> None:
        pair = ca.issue(tmp_path)
        serving = ServingCertificate(pair.cert, pair.key)
        pair.key.unlink()
        assert not serving.reload("SIGHUP")
        assert serving.facts.serial == pair.serial


class TestHandshakeFailureReasons:
    @pytest.mark.parametrize(
        ("reason", "label"),
        [
            ("HTTP_REQUEST", "plain_http"),
            ("WRONG_VERSION_NUMBER", "not_tls"),
            ("UNSUPPORTED_PROTOCOL", "protocol_version"),
            ("TLSV1_ALERT_UNKNOWN_CA", "client_alert"),
            ("NO_SHARED_CIPHER", "no_shared_cipher"),
            ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "client_certificate"),
            ("SOMETHING_ELSE", "tls_error"),
        ],
    )
    def test_ssl_reasons(self, reason: str, label: str) -> None:
        error = ssl.SSLError(1, reason)
        error.reason = reason
        assert handshake_failure_reason(error) == label

    def test_others(self) -> None:
        assert handshake_failure_reason(TimeoutError()) == "timeout"
        assert handshake_failure_reason(ConnectionResetError()) == "closed"
        assert handshake_failure_reason(ValueError()) == "error"
