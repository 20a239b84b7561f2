"""Chromium's own WebSocket over wss:// to the gateway, with a certificate made for the test.

Chromium is told to accept that one certificate (by the hash of its public key,
``--ignore-certificate-errors-spki-list``), not to skip verification at large:
a page that connects anywhere else with a bad certificate still fails.
"""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from test_dashboard import CHROMIUM_ARGS, find_chromium

from wsgate.testbed.certs import TestCA
from wsgate.testbed.processes import ProcessGroup
from wsgate.testbed.topology import start_backends, start_gateway

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The page opens a WebSocket, sends one text message and gives back the answer.
EXCHANGE = """async (url) => await new Promise((resolve, reject) => {
  const ws = new WebSocket(url);
  ws.onopen = () => ws.send("hello from chromium");
  ws.onmessage = (event) => { resolve(event.data); ws.close(); };
  ws.onerror = () => reject(new Error("websocket error"));
  setTimeout(() => reject(new Error("no answer in time")), 10000);
})"""


def spki_hash(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


async def test_chromium_websocket_over_wss(procs: ProcessGroup) -> None:
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium binary found: install Debian's chromium or set WSGATE_CHROMIUM")
    playwright_api = pytest.importorskip("playwright.async_api", reason="pip install playwright")
    pair = TestCA().issue(procs.log_dir / "tls")
    backends = start_backends(procs, 1)
    gateway = start_gateway(procs, backends, tls={"cert": str(pair.cert), "key": str(pair.key)})
    url = f"wss://127.0.0.1:{gateway.port}/"
    trust = f"--ignore-certificate-errors-spki-list={spki_hash(pair.cert.read_bytes())}"
    async with playwright_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=chromium, args=[*CHROMIUM_ARGS, trust]
        )
        try:
            page = await browser.new_page()
            answer = json.loads(await page.evaluate(EXCHANGE, url))
        finally:
            await browser.close()
    assert answer["pod"] == "pod-a" and answer["echo"] == "hello from chromium"
    stats = backends[0].stats()
    assert stats["total_connections"] == 1 and stats["messages"] >= 1
