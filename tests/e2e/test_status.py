"""`mailhaven status` against a real daemon (with a worker process): listeners, queue counts
over every shard, the certificate's expiry; and a clear exit 1 when no daemon runs."""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.server import MailServer

pytestmark = pytest.mark.e2e


def status(server: MailServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailhaven", "status", "-c", str(server.config_path), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_status_of_a_running_daemon_and_of_none(mail_server: ServerFactory) -> None:
    server = mail_server(
        settings={
            "local_users": ["postmaster"],
            "smtp_processes": 2,
            "etrn": {"held_domains": ["held.example"]},
        },
        services=("smtp", "submission"),
    )
    server.wait_for_log(r"worker 1 ready")
    for n in range(4):  # a few connections, so both processes are likely to take some
        with smtplib.SMTP(server.host, server.smtp_port, timeout=10) as client:
            client.sendmail("a@example.org", [f"u{n}@held.example"], b"Subject: held\r\n\r\nx\r\n")
    facts = json.loads(status(server, "--json").stdout)
    assert facts["queue"]["messages"] == 4 and facts["queue"]["held"] == 4
    assert facts["workers"] == 1 and facts["processes"] == 2
    assert facts["listeners"]["smtp"] == [f"127.0.0.1:{server.smtp_port}"]
    cert = facts["certificate"]
    assert cert["subject"] == "CN=mx.test" and cert["days_left"] > 300  # the self-signed one
    text = status(server)
    assert text.returncode == 0
    assert "queue:      4 message(s); recipients: 0 active, 0 incoming, 0 deferred, 4 held" in (
        text.stdout
    )
    assert f"smtp:       127.0.0.1:{server.smtp_port}" in text.stdout
    assert server.stop() == 0
    gone = status(server)
    assert gone.returncode == 1 and "the daemon is not running" in gone.stderr
