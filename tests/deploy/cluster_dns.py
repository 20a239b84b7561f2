"""Cluster DNS for pods that podman runs: the answers a Kubernetes cluster's DNS gives.

Runs inside a container of the wsgate image (dnslib is one of its dependencies):
``python3 cluster_dns.py RECORDS.json``. The file, read again on every query so the
test can change it, maps names to addresses. A name listed under ``"services"``
stands for a ClusterIP Service: each query gets one of its addresses in turn, as
kube-proxy spreads connections over a Service's pods. Other names are headless:
every address in one answer.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

from dnslib import QTYPE, RCODE, RR, A, DNSError, DNSRecord

__all__ = ["answer"]


def answer(packet: bytes, records: dict[str, object], turns: dict[str, int]) -> bytes | None:
    """The reply to one query; ``turns`` counts the A queries each Service had."""
    try:
        query = DNSRecord.parse(packet)
    except DNSError:
        return None
    reply = query.reply()
    name = str(query.q.qname).rstrip(".").lower()
    names: dict[str, list[str]] = records.get("names", {})  # type: ignore[assignment]
    services: list[str] = records.get("services", [])  # type: ignore[assignment]
    if name not in names:
        reply.header.rcode = RCODE.NXDOMAIN
    elif QTYPE.get(query.q.qtype) == "A" and names[name]:
        chosen = names[name]
        if name in services:
            turn = turns.get(name, 0)
            turns[name] = turn + 1
            chosen = [chosen[turn % len(chosen)]]
        for address in chosen:
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(address), ttl=0))
    data: bytes = reply.pack()
    return data


def main() -> None:
    path = Path(sys.argv[1])
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("0.0.0.0", 53))
    turns: dict[str, int] = {}
    while True:
        packet, peer = server.recvfrom(4096)
        try:
            records = json.loads(path.read_text())
        except (OSError, ValueError):
            records = {}
        data = answer(packet, records, turns)
        if data is not None:
            server.sendto(data, peer)


if __name__ == "__main__":
    main()
