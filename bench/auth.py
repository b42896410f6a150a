"""Scenario "auth": accepting 1 KiB DKIM-signed mail from an untrusted client, checks on.

    .venv/bin/python bench/auth.py [--reps 3] [--count 2000] [--sessions 10]

Both systems take the same prepared message (From: and DKIM d= bank.test, RSA-2048, relaxed/
relaxed, 1 KiB) from `smtp-source -F` at 127.0.0.1, which neither treats as trusted, and hold
it durably without delivering:
- mailhaven, `[inbound_auth]` at its defaults: SPF for MAIL FROM and HELO, DKIM, DMARC, ARC,
  one Authentication-Results field;
- Postfix with Debian's OpenDKIM as a milter (verify mode) and postfix-policyd-spf-python as its
  policy service (`check_policy_service`, spawned by master(8)): SPF and DKIM, no DMARC (the
  issue names no DMARC milter for the peer, so the peer does less work than we do).
DNS comes from the tests' loopback server (tests/support/dns_server.py): mailhaven through
`[relay] nameservers`, policyd-spf through pydns's defaults (bench/policyd_spf_peer.py);
OpenDKIM reads its one key from a file (see `OpenDKIM`), which only favours the peer. Before measuring, one message
to each system is checked to carry passing results, so neither skips its checks.

The systems alternate per repetition from an empty queue (mailhaven restarted on a fresh state
directory, Postfix's queue emptied), as in throughput.py; a run counts only when every message
was stored. Results go to bench/results/auth-<UTC time>.jsonl; docs/benchmarks.md has numbers.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import common
import peers
import report
import throughput
from common import HOST

sys.path.insert(0, str(common.ROOT))
from tests.support.dns_server import DNSServer

DOMAIN = "bank.test"
SENDER = f"boss@{DOMAIN}"
SIZE = 1024
WORK = common.TMP / "auth"
WRAPPER = common.BENCH / "policyd_spf_peer.py"
#: the Postfix peer's "trusted" network: anything but the loopback the client comes from
NOT_US = "192.0.2.1/32"


def make_message(pem: bytes) -> bytes:
    """A signed message of SIZE octets (CRLF), From: and d= the same domain."""
    import dkim

    head = (f"From: The Boss <{SENDER}>\r\nTo: rcpt@bench.test\r\nSubject: invoice\r\n"
            f"Date: Fri, 04 Dec 2026 12:00:00 +0000\r\nMessage-ID: <bench@{DOMAIN}>\r\n\r\n")
    line = b"The quarterly invoice is attached; please pay it within thirty days.\r\n"
    body = b""
    while True:
        msg = head.encode() + body
        signed = bytes(dkim.sign(msg, b"sel", DOMAIN.encode(), pem,
                                 canonicalize=(b"relaxed", b"relaxed"))) + msg
        if len(signed) + len(line) > SIZE:
            return signed
        body += line


def key() -> tuple[bytes, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = k.private_bytes(serialization.Encoding.PEM,
                          serialization.PrivateFormat.TraditionalOpenSSL,
                          serialization.NoEncryption())
    der = k.public_key().public_bytes(serialization.Encoding.DER,
                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"


class OpenDKIM:
    """A private opendkim (verify only) on a loopback port. It reads the public key from a file
    (`TestPublicKeys`), not from DNS: its libunbound resolver did not reach the loopback test
    server (neither `ResolverConfiguration` with a forward nor `Nameservers addr@port` sent a
    query there). That spares the peer its key lookups, so our ratio is on the safe side."""

    def __init__(self, record: str) -> None:
        self.port = common.free_port()
        self.dir = WORK / "opendkim"
        self.record = record
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        common.fresh_dir(self.dir)
        keys = self.dir / "keys"
        keys.write_text(f"sel._domainkey.{DOMAIN} {self.record}\n")
        conf = self.dir / "opendkim.conf"
        conf.write_text(
            f"Mode v\nSocket inet:{self.port}@{HOST}\nSyslog no\n"
            f"InternalHosts {NOT_US}\nTestPublicKeys {keys}\n"
            "AuthservID pf.bench.test\nAlwaysAddARHeader yes\n")
        self.proc = common.spawn(["opendkim", "-f", "-x", str(conf)],
                                 log_to=self.dir / "opendkim.log")
        common.wait_port(self.port, 30, self.proc)

    def stop(self) -> None:
        common.stop(self.proc)
        self.proc = None


class AuthPostfix(peers.Postfix):
    """The bench Postfix plus one smtpd listener that checks: the OpenDKIM milter and the SPF
    policy service, for clients outside `mynetworks` (set to NOT_US there)."""

    def __init__(self, sink_port: int, milter_port: int, dns_port: int) -> None:
        super().__init__(sink_port)
        self.auth_port = common.free_port()
        self.milter_port = milter_port
        self.dns_port = dns_port

    def setup(self, extra: dict[str, str] | None = None) -> None:
        super().setup(extra)
        spf_conf = self.etc / "policyd-spf.conf"
        spf_conf.write_text("debugLevel = 0\nTestOnly = 1\nHELO_reject = Fail\n"
                            f"Mail_From_reject = Fail\nskip_addresses = {NOT_US}\n")
        restrictions = ("check_policy_service,unix:private/policyd-spf,"
                        "check_recipient_access,static:HOLD,reject_unauth_destination,permit")
        with open(self.etc / "master.cf", "a") as f:
            f.write(
                f"{HOST}:{self.auth_port} inet n - n - - smtpd\n"
                f"  -o mynetworks={NOT_US}\n"
                f"  -o smtpd_recipient_restrictions={restrictions}\n"
                f"  -o smtpd_relay_restrictions=reject_unauth_destination,permit\n"
                f"  -o smtpd_milters=inet:{HOST}:{self.milter_port}\n"
                f"  -o milter_default_action=tempfail\n"
                f"policyd-spf unix - n n - 0 spawn\n"
                f"  user=nobody argv=/usr/bin/python3 {WRAPPER} {self.dns_port} {spf_conf}\n")
        self._pf("check")

    def start(self) -> None:
        super().start()
        common.wait_port(self.auth_port, 30)

    def held_message(self) -> str:
        """The text of one held message (for the pre-flight check)."""
        for path in (self.queue / "hold").rglob("*"):
            if path.is_file():
                return common.run(["postcat", "-c", str(self.etc), str(path)],
                                  check=False).stdout
        return ""


def preflight(system: throughput.System, message_file: Path, look: Callable[[], str]) -> None:
    """Send one message and check the system really checked it (`look` returns its verdict)."""
    system.reset()
    common.run([*common.postfix_tool("smtp-source"), "-m", "1", "-f", SENDER, "-t",
                "rcpt@bench.test", "-M", "client.bench.test", "-F", str(message_file),
                f"{HOST}:{system.port()}"], timeout=60)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        verdict = look()
        if verdict:
            common.log(f"  {system.name}: {verdict}")
            return
        time.sleep(0.2)
    raise SystemExit(f"{system.name}: the checked message shows no passing results")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--processes", type=int, default=None,
                    help="mailhaven's smtp_processes (default: the server's own default, "
                         "\"auto\"; the peer runs a process per session)")
    a = ap.parse_args()
    for tool in ("opendkim", "postfix", "/usr/bin/policyd-spf"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: scripts/install-test-deps")
    atexit.register(common.stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    rec = report.Recorder(f"auth-{stamp}")
    common.fresh_dir(WORK)
    pem, record = key()
    message = make_message(pem)
    message_file = WORK / "message.eml"
    message_file.write_bytes(message.replace(b"\r\n", b"\n"))  # smtp-source -F adds CRLF
    zone = {
        DOMAIN: {"TXT": [f"v=spf1 ip4:{HOST}/8 -all"]},
        f"_dmarc.{DOMAIN}": {"TXT": ["v=DMARC1; p=reject"]},
        f"sel._domainkey.{DOMAIN}": {"TXT": [record]},
        "client.bench.test": {"A": [HOST]},
    }
    dns = DNSServer(zone).start()
    odk = OpenDKIM(record)
    sink = peers.SmtpSink("auth-sink")
    pf = AuthPostfix(0, odk.port, dns.address[1])
    mh = peers.Mailhaven("mailhaven-auth", "hold", extra={
        "": {"trusted_networks": [],
             **({} if a.processes is None else {"smtp_processes": a.processes})},
        "relay": {"nameservers": [f"{HOST}:{dns.address[1]}"]},
    })
    try:
        odk.start()
        sink.start()
        pf.sink_port = sink.port
        pf.setup()
        pf.start()
        mh.start()
        ours = throughput.mailhaven(mh)
        theirs = throughput.System("postfix+opendkim+policyd-spf", lambda: pf.auth_port,
                                   lambda: common.tree_cpu(pf.master_pid())
                                   + common.proc_cpu(odk.proc.pid if odk.proc else 0),
                                   pf.clear_queue, stored=pf.qsize)

        def mailhaven_verdict() -> str:
            lines = [ln for ln in mh.log.read_text(errors="replace").splitlines()
                     if ": auth: " in ln]
            ok = lines and all(w in lines[-1] for w in ("spf=pass", "dkim=pass", "dmarc=pass"))
            return lines[-1].split(": auth: ", 1)[1] if ok else ""

        def postfix_verdict() -> str:
            text = pf.held_message()
            ok = "dkim=pass" in text and "Received-SPF: Pass" in text
            return "OpenDKIM dkim=pass, policyd-spf Received-SPF: Pass" if ok else ""

        preflight(ours, message_file, mailhaven_verdict)
        preflight(theirs, message_file, postfix_verdict)
        sc = throughput.Scenario("auth. acceptance 1 KiB DKIM-signed, checks on, s="
                                 f"{a.sessions}", SIZE, a.sessions, a.count,
                                 [report.Goal("ratio>=", 2.0, theirs.name)])
        rec.write("meta", command=" ".join(["bench/auth.py", *sys.argv[1:]]), date=stamp,
                  smtp_processes=a.processes or "auto",
                  message_bytes=len(message), postfix=peers.postfix_version())
        metrics = run(sc, [ours, theirs], a.reps, message_file, rec)
        rec.summary(metrics)
        for line in report.table(metrics):
            print(line)
        common.log(f"results: {rec.close()}")
    finally:
        mh.stop()
        pf.teardown()
        sink.stop()
        odk.stop()
        dns.stop()
    return 0


def run(sc: throughput.Scenario, systems: list[throughput.System], reps: int,
        message_file: Path, rec: report.Recorder) -> list[report.Metric]:
    import load

    rate = report.Metric(sc.target, "accepted", "msg/s", systems[0].name, sc.goals)
    cpu = report.Metric(sc.target, "server CPU per message", "ms", systems[0].name)
    for rep in range(reps):
        k = rep % len(systems)
        for system in systems[k:] + systems[:k]:
            system.reset()
            common.settle(2.0)
            quiet = load.wait_quiet()
            result = load.measure(system.port(), system.cpu, size=sc.size, sessions=sc.sessions,
                                  count=sc.count, timeout=300.0, sender=SENDER,
                                  extra=["-F", str(message_file)])
            throughput.check(result, system)
            rec.write("run", scenario=sc.target, system=system.name, rep=rep,
                      busy_before_pct=quiet, **result)
            common.log(f"  {system.name:<30} rep {rep}: {result['msgs_per_s']:>8.1f} msg/s  "
                       f"cpu {result['server_cpu_ms_per_msg']:.2f} ms/msg, "
                       f"others {result['others_busy_pct']:.0f}% busy"
                       + ("" if result["ok"] else f"  NOT OK: {result.get('problem', '')}"))
            if result["ok"]:
                rate.add(system.name, result["msgs_per_s"])
                cpu.add(system.name, result["server_cpu_ms_per_msg"])
    return [rate, cpu]


if __name__ == "__main__":
    sys.exit(main())
