"""Request heads the fuzz tests found interesting, with the verdict the gateway must give.

Each is replayed by ``test_head_fuzz.test_corpus``; the RFCs' model must allow
the verdict too.
"""

from __future__ import annotations

from rfc_head import Outcome

__all__ = ["CASES"]

HTTP, WEBSOCKET, REFUSE = Outcome.HTTP, Outcome.WEBSOCKET, Outcome.REFUSE
_HANDSHAKE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)

_GET = b"GET / HTTP/1.1\r\nHost: a\r\n"

CASES: list[tuple[str, bytes, Outcome]] = [
    ("handshake", _GET + _HANDSHAKE + b"\r\n", WEBSOCKET),
    (
        "handshake_in_other_cases",
        b"GET / HTTP/1.1\r\nhOST: a\r\nUPGRADE: WebSocket\r\nconnection: keep-alive, UPGRADE\r\n"
        b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nSEC-WEBSOCKET-VERSION: 13\r\n\r\n",
        WEBSOCKET,
    ),
    # RFC 9112 3.2: Host, once and valid, in HTTP/1.1 (these were served before).
    ("no_host", b"GET / HTTP/1.1\r\n\r\n", REFUSE),
    ("two_hosts", b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", REFUSE),
    ("invalid_host", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", REFUSE),
    ("handshake_without_host", b"GET / HTTP/1.1\r\n" + _HANDSHAKE + b"\r\n", REFUSE),
    ("empty_host", b"GET / HTTP/1.1\r\nHost:\r\n\r\n", HTTP),
    ("http10_without_host", b"GET / HTTP/1.0\r\n\r\n", HTTP),
    # No version: llhttp reads HTTP/0.9, which the gateway forwarded (found live).
    ("no_version", b"POST /echoHTTP/1.1\r\nHost: a\r\n\r\n", REFUSE),
    ("http2_request_line", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", REFUSE),
    # RFC 9112 2.2: empty lines may precede the request line; a bare CR may not
    # (llhttp skips any run of CR and LF there; this was served before).
    ("empty_lines_first", b"\r\n\r\n" + _GET + b"\r\n", HTTP),
    ("bare_cr_first", b"\r\r\n" + _GET + b"\r\n", REFUSE),
    # RFC 6455 11.3.1, 11.3.5: key and version once (the first one was taken before).
    (
        "two_keys",
        _GET + _HANDSHAKE + b"Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n",
        REFUSE,
    ),
    ("two_versions", _GET + _HANDSHAKE + b"Sec-WebSocket-Version: 8\r\n\r\n", REFUSE),
    ("version_list", _GET + _HANDSHAKE.replace(b"13", b"13, 8") + b"\r\n", REFUSE),
    # RFC 9112 6.1: a coding other than chunked last is a 400 (the upgrade went through).
    ("handshake_with_identity", _GET + _HANDSHAKE + b"Transfer-Encoding: identity\r\n\r\n", REFUSE),
    # RFC 9112 5: the value's trailing OWS is not part of it (it was forwarded).
    ("trailing_ows", _GET + b"X-A: v  \t\r\n\r\n", HTTP),
    ("obs_text_value", _GET + b"X-A: caf\xe9\r\n\r\n", HTTP),
    ("leading_empty_line", b"\r\n" + _GET + b"\r\n", HTTP),
    # Refused where the RFC lets a recipient choose (bare LF, obs-fold, NUL) or says 400.
    ("bare_lf", b"GET / HTTP/1.1\nHost: a\n\n", REFUSE),
    ("bare_cr", _GET + b"X-A: a\rb\r\n\r\n", REFUSE),
    ("obs_fold", _GET + b"X-A: a\r\n b\r\n\r\n", REFUSE),
    ("nul_in_value", _GET + b"X-A: a\x00b\r\n\r\n", REFUSE),
    ("nul_first", b"\x00", REFUSE),
    ("space_before_colon", b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", REFUSE),
    ("space_before_first_field", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", REFUSE),
    (
        "length_and_chunked",
        _GET + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        REFUSE,
    ),
    ("lengths_that_differ", _GET + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\n", REFUSE),
    # Stricter than the RFC on purpose: whitespace after a framing value.
    ("chunked_then_tab", _GET + b"Transfer-Encoding: chunked\t\r\n\r\n0\r\n\r\n", REFUSE),
    ("chunked_then_lf", _GET + b"Transfer-Encoding:chunked\n\r\n", REFUSE),
]
