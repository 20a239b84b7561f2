"""The DNS client's pure parts: resolv.conf, queries and answers (RFC 1035, RFC 6891)."""

from __future__ import annotations

from pathlib import Path

import pytest
from dnslib import AAAA, CNAME, QTYPE, RCODE, RR, A, DNSRecord

from wsgate.upstreams.dns import (
    DnsFailure,
    build_query,
    nameserver_from_resolv_conf,
    read_answer,
    system_nameserver,
)


class TestResolvConf:
    def test_first_nameserver(self):
        text = "# comment\nsearch svc.cluster.local\nnameserver 10.96.0.10\nnameserver 8.8.8.8\n"
        assert nameserver_from_resolv_conf(text) == "10.96.0.10"
        assert nameserver_from_resolv_conf("options ndots:5\nnameserver   ::1  \n") == "::1"
        assert nameserver_from_resolv_conf("search x\nnameserver\n") is None

    def test_local_host_when_none_is_set(self, tmp_path: Path):
        assert system_nameserver(tmp_path / "absent") == ("127.0.0.1", 53)
        conf = tmp_path / "resolv.conf"
        conf.write_text("nameserver 192.0.2.53\n")
        assert system_nameserver(conf) == ("192.0.2.53", 53)


def reply_to(question: DNSRecord, *records: RR, rcode: int = RCODE.NOERROR) -> DNSRecord:
    reply = question.reply()
    reply.header.rcode = rcode
    for record in records:
        reply.add_answer(record)
    return DNSRecord.parse(reply.pack())


class TestAnswers:
    def test_query_asks_for_recursion_with_a_large_udp_payload(self):
        question = build_query("ws.test.local", "AAAA")
        parsed = DNSRecord.parse(question.pack())
        assert parsed.header.rd
        assert parsed.q.qtype == QTYPE.AAAA
        [opt] = parsed.ar
        assert opt.rtype == QTYPE.OPT and opt.rclass == 4096  # EDNS0 UDP payload size

    def test_addresses_of_the_asked_type(self):
        question = build_query("ws.test.local", "A")
        reply = reply_to(
            question,
            RR("ws.test.local", QTYPE.CNAME, rdata=CNAME("pods.test.local")),
            RR("pods.test.local", QTYPE.A, rdata=A("10.0.0.2")),
            RR("pods.test.local", QTYPE.A, rdata=A("10.0.0.1")),
        )
        assert read_answer(question, reply) == ["10.0.0.2", "10.0.0.1"]

    def test_ipv6_is_written_compressed(self):
        question = build_query("ws.test.local", "AAAA")
        reply = reply_to(question, RR("ws.test.local", QTYPE.AAAA, rdata=AAAA("fd00:0:0::0001")))
        assert read_answer(question, reply) == ["fd00::1"]

    def test_no_such_name_and_no_records_mean_no_backends(self):
        question = build_query("gone.test.local", "A")
        assert read_answer(question, reply_to(question, rcode=RCODE.NXDOMAIN)) == []
        assert read_answer(question, reply_to(question)) == []

    @pytest.mark.parametrize("rcode", [RCODE.SERVFAIL, RCODE.REFUSED, RCODE.FORMERR])
    def test_a_failing_server_is_no_answer(self, rcode: int):
        question = build_query("ws.test.local", "A")
        with pytest.raises(DnsFailure, match=f"the server answered {RCODE.get(rcode)}"):
            read_answer(question, reply_to(question, rcode=rcode))

    def test_a_reply_to_another_question_is_refused(self):
        question = build_query("ws.test.local", "A")
        other = build_query("other.test.local", "A")
        other.header.id = question.header.id
        with pytest.raises(DnsFailure, match="does not match"):
            read_answer(question, reply_to(other))
