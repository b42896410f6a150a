"""`mailhaven status`: what the running daemon says of itself, over its control socket.

In: the configuration (to find `<state_dir>/control.sock`). Out: listeners, queue counts (all
shards), uptime and the certificate's expiry, as text or `--json`. Exit 0 when the daemon
answered, 1 when none runs (it says so: a status command that printed nothing would hide that).
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from mailhaven.config import Config
from mailhaven.control import channel as control


def main(config: Config, *, as_json: bool, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    path = config.state_path / control.SOCKET_NAME
    try:
        answer = control.request(path, {"cmd": "status"}, timeout=30.0)
    except control.ControlError as err:
        print(f"mailhaven: status: {err}", file=sys.stderr)
        return 1
    if answer is None:
        print(f"mailhaven: the daemon is not running (nobody answers on {path})",
              file=sys.stderr)
        return 1
    status = answer.get("status")
    if not answer.get("ok") or not isinstance(status, dict):
        print(f"mailhaven: status: {answer.get('error', 'no status in the answer')}",
              file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(status, indent=2, sort_keys=True), file=out)
    else:
        out.write(render(status))
    return 0


def render(status: dict[str, Any]) -> str:
    """The human form: one fact a line, the way `postfix status` plus `qshape` would tell it."""
    lines = [
        f"mailhaven {status.get('version', '?')} is running (pid {status.get('pid', '?')}), "
        f"up {_duration(float(status.get('uptime', 0)))}",
        f"  hostname:   {status.get('hostname', '?')}",
        f"  config:     {status.get('config', '?')}",
        f"  state:      {status.get('state_dir', '?')}",
    ]
    for name, addresses in (status.get("listeners") or {}).items():
        lines.append(f"  {name + ':':<11} {', '.join(addresses)}")
    queue = status.get("queue") or {}
    lines.append(
        f"  queue:      {queue.get('messages', 0)} message(s); recipients: "
        f"{queue.get('active', 0)} active, {queue.get('incoming', 0)} incoming, "
        f"{queue.get('deferred', 0)} deferred, {queue.get('held', 0)} held"
    )
    cert = status.get("certificate")
    if isinstance(cert, dict):
        if "error" in cert:
            lines.append(f"  certificate: {cert.get('file')}: {cert['error']}")
        else:
            lines.append(
                f"  certificate: {cert.get('subject')} (issuer {cert.get('issuer')}), expires "
                f"{cert.get('not_after')}, {cert.get('days_left')} day(s) left"
            )
    else:
        lines.append("  certificate: none (no listener needs TLS)")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return (f"{days}d " if days else "") + f"{hours:02d}:{minutes:02d}:{secs:02d}"
