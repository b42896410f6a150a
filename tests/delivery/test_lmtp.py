"""The LMTP agent against a real Dovecot LMTP (unix socket and TCP), per-recipient results."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import pytest
from tests.fakes import maildir_messages
from tests.support.dovecot_lmtp import DovecotStore, dovecot_store
from tests.support.server import free_port

from mailhaven.delivery.base import DeliveryRequest
from mailhaven.delivery.lmtp import LmtpAgent, LmtpTarget, parse_target, temporary
from mailhaven.proto.envelope import Envelope, RecipientSpec
from mailhaven.proto.replies import Reply
from mailhaven.proto.smtp_client import Timeouts
from mailhaven.routing.route import Route, transport_route

SIEVE_FILEINTO = """require ["fileinto", "mailbox"];
if header :contains "subject" "[list]" { fileinto :create "lists"; }
"""


def body(subject: str = "hello", size: int = 100) -> bytes:
    return (
        f"From: s@remote.example\r\nTo: alice@store.example\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@remote.example>\r\n\r\n"
    ).encode() + b"x" * size + b"\r\n"


def request(nexthop: str, *rcpts: str, data: bytes | None = None) -> DeliveryRequest:
    env = Envelope(sender="s@remote.example", recipients=tuple(RecipientSpec(r) for r in rcpts))
    payload = data if data is not None else body()

    def open_message() -> BinaryIO:
        return io.BytesIO(payload)

    return DeliveryRequest("4LMTPQ", env, rcpts, Route("lmtp", nexthop), open_message,
                           len(payload))


def stored(store: DovecotStore, user: str, folder: str = "") -> list[bytes]:
    return maildir_messages(store.maildir(user) / (f".{folder}" if folder else ""))


FAST = Timeouts(connect=5, greeting=10, helo=10, mail=10, rcpt=10, data_init=10,
                data_block=10, data_end=10, rset=5, quit=5)


@pytest.mark.parametrize("how", ["unix", "tcp"])
async def test_per_recipient_results_from_dovecot(tmp_path: Path, how: str) -> None:
    with dovecot_store(tmp_path, sieve_scripts={"alice": SIEVE_FILEINTO}) as store:
        hop = f"unix:{store.lmtp_socket}" if how == "unix" else f"[127.0.0.1]:{store.lmtp_port}"
        agent = LmtpAgent("mx.example", timeouts=FAST)
        result = await agent.deliver(request(
            hop, "alice@store.example", "nobody-here@store.example", "bob@store.example",
            data=body("[list] weekly"),
        ))
        codes = {k: (v.code, v.enhanced) for k, v in result.replies.items()}
        assert codes["alice@store.example"][0] == 250
        assert codes["bob@store.example"][0] == 250
        assert codes["nobody-here@store.example"] == (550, "5.1.1")
        assert result.relay_host.startswith("localhost[") or "127.0.0.1" in result.relay_host
        # Sieve filed alice's copy; bob has no script: his INBOX
        assert len(stored(store, "alice", "lists")) == 1
        assert stored(store, "alice") == []
        [bobs] = stored(store, "bob")
        assert b"Subject: [list] weekly" in bobs
        assert b"Return-Path: <s@remote.example>" in bobs


async def test_quota_full_is_deferred_for_that_recipient_only(tmp_path: Path) -> None:
    with dovecot_store(tmp_path, quota_rule="4") as store:  # 4 KiB each
        agent = LmtpAgent("mx.example", timeouts=FAST)
        hop = f"unix:{store.lmtp_socket}"
        first = await agent.deliver(request(hop, "carol@store.example", data=body("big", 3500)))
        assert first.replies["carol@store.example"].code == 250
        result = await agent.deliver(request(
            hop, "alice@store.example", "carol@store.example", data=body("second", 1000)
        ))
        assert result.replies["alice@store.example"].code == 250
        over = result.replies["carol@store.example"]
        assert (over.code, over.enhanced) == (452, "4.2.2")  # quota_full_tempfail: deferred
        assert len(stored(store, "carol")) == 1


async def test_dovecot_down_is_temporary(tmp_path: Path) -> None:
    agent = LmtpAgent("mx.example", timeouts=FAST)
    result = await agent.deliver(request(f"unix:{tmp_path}/no-such.sock", "alice@x"))
    assert result.replies["alice@x"].code == 421 and not result.replies["alice@x"].is_permanent
    port = free_port()
    result = await agent.deliver(request(f"[127.0.0.1]:{port}", "alice@x", "bob@x"))
    assert {r.code // 100 for r in result.replies.values()} == {4}


def test_targets_and_routes() -> None:
    assert parse_target("unix:/run/dovecot/lmtp") == LmtpTarget("localhost", 24, "/run/dovecot/lmtp")
    assert parse_target("[127.0.0.1]:2424") == LmtpTarget("127.0.0.1", 2424)
    assert parse_target("store.example") == LmtpTarget("store.example", 24)
    assert transport_route("lmtp:unix:/x") == Route("lmtp", "unix:/x")
    assert transport_route("LMTP:[::1]:24") == Route("lmtp", "[::1]:24")
    assert transport_route("[10.0.0.1]:25") == Route("relay", "[10.0.0.1]:25")


def test_permanent_session_failure_becomes_temporary() -> None:
    soft = temporary(Reply(500, "what is LHLO", "5.5.2"))
    assert (soft.code, soft.enhanced) == (451, "4.5.2")
    assert temporary(Reply(421, "bye", "4.3.2")) == Reply(421, "bye", "4.3.2")


def test_router_sends_lmtp_domains_to_the_lmtp_transport() -> None:
    from mailhaven.routing.router import Router

    router = Router(
        local_domains=["local.example"],
        mailboxes=lambda: {"alice"},
        relay_domains=["relayed.example"],
        transport_map={
            "local.example": "lmtp:unix:/run/dovecot/lmtp",
            "relayed.example": "lmtp:[127.0.0.1]:24",
            ".sub.example": "lmtp:[::1]:2424",
            "smtp.example": "[10.0.0.1]:25",
        },
    )
    assert router.route("alice@local.example") == Route("lmtp", "unix:/run/dovecot/lmtp")
    assert router.route("anyone@relayed.example") == Route("lmtp", "[127.0.0.1]:24")
    assert router.route("x@a.sub.example") == Route("lmtp", "[::1]:2424")
    assert router.route("x@smtp.example") == Route("relay", "[10.0.0.1]:25")
    assert router.check_recipient("bob@local.example", client_ip="192.0.2.1",
                                  authenticated=False) is not None  # still our users only
    assert router.check_recipient("anyone@relayed.example", client_ip="192.0.2.1",
                                  authenticated=False) is None
