"""Scale-up through DNS discovery: backends join by appearing in a real DNS server's answers.

The gateway asks a DNS server on loopback for the A records of a headless
Service name; two more pod addresses appear; the gateway moves sessions onto them
at no more than the close budget, each client closed at most once.
"""

from __future__ import annotations

import pytest
from lifecycle import start_discovering
from scaleup import REBALANCE, check_closes, scale_up
from tinydns import TinyDns

from wsgate.testbed.processes import ProcessGroup, free_port, wsgate_argv
from wsgate.testbed.topology import BackendProcess


@pytest.mark.slow
async def test_scale_up_with_dns_discovery(procs: ProcessGroup, dns: TinyDns) -> None:
    # A headless Service: one name, one port, one address per pod.
    port = free_port()
    backends = []
    for index, ip in enumerate(["127.0.0.2", "127.0.0.3", "127.0.0.4"]):
        pod = f"pod-{'abc'[index]}"
        argv = wsgate_argv("backend", "--host", ip, "--port", str(port), "--pod-id", pod)
        process = procs.start(pod, argv, port=(ip, port))
        backends.append(BackendProcess(pod, ip, port, process))
    name = "ws-backend-headless.default.svc.cluster.local"
    dns.records[name] = ["127.0.0.2"]
    discovery = {
        "dns": {"name": name, "port": port, "refresh": "200ms", "server": f"127.0.0.1:{dns.port}"}
    }
    gateway = start_discovering(procs, discovery, **REBALANCE)

    async def add() -> None:
        dns.records[name] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]

    closes = await scale_up(procs, [gateway], backends, add)
    check_closes(closes, moved_at_least=19)
    ids = sorted(b["id"] for b in gateway.admin("/clusters")["backends"])
    assert ids == [f"127.0.0.{n}:{port}" for n in (2, 3, 4)]
