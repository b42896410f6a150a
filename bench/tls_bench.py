"""Scenario "accept_tls_1k": accept-only 1 KiB mail, 10 sessions, a new connection per message,
STARTTLS on every connection, as most inbound MX traffic arrives.

    .venv/bin/python bench/tls_bench.py [--reps 3] [--count 1500] [--keys ec rsa]
    .venv/bin/python bench/run.py quick --only accept_tls_1k     # the same, ECDSA only

Systems, all with the same certificate (a fresh self-signed one per key type: ECDSA P-256,
which mailhaven's own self-signed certificate also uses, and RSA 2048, Debian's snakeoil type):
- mailhaven with its defaults plus `[tls] cert/key`, accept-only ("hold", as accept_1k);
- Postfix 3.7 with `smtpd_tls_security_level = may`, `smtpd_tls_chain_files`, and tlsmgr(8) in
  master.cf as in Debian's (it keeps the session-ticket keys of all smtpd processes), its HOLD
  listener (durable enqueue, no delivery);
- tls_sink.py, a trivial STARTTLS responder: the load client's ceiling on this machine.
The client is tls_load.c (tls_load.py where it does not build; smtp-source has no TLS). Two
variants: "full" (every connection a full handshake, as from senders without a session cache:
Postfix's smtp client without `smtp_tls_session_cache_database`) and "resume" (each client
process offers its previous session: TLS 1.3 tickets). Each run records how many handshakes
the server resumed, so a variant whose resumption silently failed shows it. Systems alternate
per repetition from an empty queue, as in throughput.py; a run counts when every message got
its 250 and (mailhaven, Postfix) is in the queue.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC
from pathlib import Path

import common
import load
import peers
import report
import throughput
from common import HOST

WORK = common.TMP / "tls"
SIZE = 1024
SESSIONS = 10
KEYS = {"ec": "ECDSA P-256", "rsa": "RSA 2048"}
VARIANTS = {"full": "full handshake", "resume": "resumed (TLS 1.3 ticket)"}


def make_cert(kind: str, where: Path) -> tuple[Path, Path]:
    """A self-signed certificate for mx.bench.test with a `kind` key; (cert, key) PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if kind == "ec"
        else rsa.generate_private_key(public_exponent=65537, key_size=2048))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mx.bench.test")])
    now = datetime.datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("mx.bench.test")]), False)
            .sign(key, hashes.SHA256()))
    where.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = where / f"{kind}.crt", where / f"{kind}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_file.chmod(0o600)
    return cert_file, key_file


class TlsPostfix(peers.Postfix):
    """The bench Postfix (its own directories under bench/tmp/tls/postfix) offering STARTTLS."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__(common.free_port())  # relays nowhere: only HOLD is used
        self.base = WORK / "postfix"
        self.etc, self.queue, self.data = self.base / "etc", self.base / "spool", self.base / "data"
        self.vmail = self.base / "vmail"
        self.cert, self.key = cert, key

    def setup(self, extra: dict[str, str] | None = None) -> None:
        super().setup({"smtpd_tls_security_level": "may",
                       "smtpd_tls_chain_files": f"{self.key}, {self.cert}", **(extra or {})})
        with open(self.etc / "master.cf", "a") as f:
            f.write("tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n")
        self._pf("check")


class TlsSink:
    def __init__(self, cert: Path, key: Path) -> None:
        self.port = common.free_port()
        self.cert, self.key = cert, key
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = common.spawn(
            [str(common.VENV_PY), str(common.BENCH / "tls_sink.py"), "--port", str(self.port),
             "--cert", str(self.cert), "--key", str(self.key)], log_to=WORK / "tls-sink.log")
        common.wait_banner(self.port, 30)

    def stop(self) -> None:
        common.stop(self.proc)
        self.proc = None


_client: list[list[str]] = []


def load_client(prefer_c: bool = True) -> list[str]:
    """The client's argv prefix: tls_load.c, built here into bench/tmp when a C compiler and
    OpenSSL's headers are present (it costs about half the Python client's CPU per message),
    else tls_load.py, which needs nothing. Both take the same options and write the same
    report."""
    if not _client:
        binary = common.TMP / "tls_load"
        built = prefer_c and shutil.which("cc") is not None and subprocess.run(
            ["cc", "-O2", "-o", str(binary), str(common.BENCH / "tls_load.c"), "-lssl",
             "-lcrypto"], capture_output=True, check=False).returncode == 0
        if prefer_c and not built:
            common.log("bench/tls_load.c does not build here (cc, libssl-dev): Python client")
        _client.append([str(binary)] if built
                       else [str(common.VENV_PY), str(common.BENCH / "tls_load.py")])
    return _client[0]


def client_argv(port: int, count: int, resume: bool, rcpt: str, report_file: Path) -> list[str]:
    return [*load_client(), "-s", str(SESSIONS),
            "-m", str(count), "-l", str(SIZE), "-f", load.SENDER, "-t", rcpt,
            "-M", "client.bench.test", "--report", str(report_file),
            *(["--resume"] if resume else []), f"{HOST}:{port}"]


def under_test(mh: peers.Mailhaven, pf: TlsPostfix, sink: TlsSink) -> list[throughput.System]:
    """mailhaven first (the ratios are ours/peer), then Postfix, then the client's ceiling."""
    return [throughput.mailhaven(mh),
            throughput.System("postfix-tls", lambda: pf.hold_port,
                              lambda: common.tree_cpu(pf.master_pid()), pf.clear_queue,
                              stored=pf.qsize),
            throughput.System("tls-sink (client ceiling)", lambda: sink.port,
                              lambda: common.tree_cpu(sink.proc.pid if sink.proc else 0),
                              lambda: None)]


def run(full: bool, reps: int, record: Callable[..., None], keys: tuple[str, ...] = ("ec",),
        count: int | None = None) -> list[report.Metric]:
    """Every key type and variant, the systems alternating `reps` times; the metrics."""
    count = count or (2000 if full else 1000)
    metrics: list[report.Metric] = []
    for kind in keys:
        stale = TlsPostfix(WORK / "none", WORK / "none")
        if stale.queue.exists():  # an interrupted run's instance: stop it before its files go
            stale.kill_stale()
        common.fresh_dir(WORK)
        cert, key = make_cert(kind, WORK / "certs")
        sink = TlsSink(cert, key)
        pf = TlsPostfix(cert, key)
        mh = peers.Mailhaven("mailhaven-tls", "hold",
                             extra={"tls": {"cert": str(cert), "key": str(key)}})
        try:
            sink.start()
            pf.setup()
            pf.start()
            mh.start()
            systems = under_test(mh, pf, sink)
            for variant, label in VARIANTS.items():
                target = (f"8. STARTTLS acceptance 1 KiB, s={SESSIONS}, {KEYS[kind]}, {label}")
                common.log(f"== {target} ({count} msgs x {reps} reps)")
                metrics += run_variant(target, systems, reps, count, variant == "resume",
                                       record)
        finally:
            mh.stop()
            pf.teardown()
            sink.stop()
    return metrics


def run_variant(target: str, systems: list[throughput.System], reps: int, count: int,
                resume: bool, record: Callable[..., None]) -> list[report.Metric]:
    goal = [report.Goal("ratio>=", 1.5, "postfix-tls")]
    rate = report.Metric(target, "accepted", "msg/s", systems[0].name, goal)
    cpu = report.Metric(target, "server CPU per message", "ms", systems[0].name)
    client = report.Metric(target, "load client CPU per message", "ms", systems[0].name)
    for rep in range(reps):
        k = rep % len(systems)
        for system in systems[k:] + systems[:k]:
            system.reset()
            common.settle(0.5)
            quiet = load.wait_quiet()
            report_file = WORK / "client-report.json"
            report_file.unlink(missing_ok=True)
            rec = load.measure(system.port(), system.cpu, size=SIZE, sessions=SESSIONS,
                               count=count, timeout=max(120.0, count / 20),
                               client=client_argv(system.port(), count, resume, system.rcpt,
                                                  report_file))
            tally = json.loads(report_file.read_text()) if report_file.exists() else {}
            rec.update(resumed=tally.get("reused"), tls_versions=tally.get("versions"),
                       client_errors=tally.get("errors"))
            throughput.check(rec, system)
            record("run", scenario=target, system=system.name, rep=rep, busy_before_pct=quiet,
                   **rec)
            common.log(f"  {system.name:<26} rep {rep}: {rec['msgs_per_s']:>7.1f} msg/s  "
                       f"cpu {rec['server_cpu_ms_per_msg']:.2f} ms/msg, client "
                       f"{rec['client_cpu_ms_per_msg']:.2f} ms/msg, resumed "
                       f"{rec['resumed']}/{count}, others {rec['others_busy_pct']:.0f}% busy"
                       + ("" if rec["ok"] else f"  NOT OK: {rec.get('problem', rec)}"))
            if rec["ok"]:
                rate.add(system.name, rec["msgs_per_s"])
                cpu.add(system.name, rec["server_cpu_ms_per_msg"])
                client.add(system.name, rec["client_cpu_ms_per_msg"])
    return [rate, cpu, client]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--count", type=int, default=1500)
    ap.add_argument("--keys", nargs="+", choices=list(KEYS), default=list(KEYS))
    ap.add_argument("--client", choices=["c", "python"], default="c",
                    help="the load client (c falls back to python where it does not build)")
    a = ap.parse_args()
    load_client(prefer_c=a.client == "c")
    atexit.register(common.stop_all)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    common.raise_nofile(20000)
    peers.install_postfix()
    stamp = datetime.datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    rec = report.Recorder(f"tls-{stamp}")
    rec.write("meta", command=" ".join(["bench/tls_bench.py", *sys.argv[1:]]), date=stamp,
              postfix=peers.postfix_version(), python=common.python_version(),
              client=load_client())
    metrics = run(True, a.reps, rec.write, tuple(a.keys), a.count)
    rec.summary(metrics)
    for line in report.table(metrics):
        print(line)
    common.log(f"results: {rec.close()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
