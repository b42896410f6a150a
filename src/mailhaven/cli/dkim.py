"""`mailhaven dkim keygen|check`: make a signing key and check that DNS publishes it.

* `keygen DOMAIN [--selector S] [--algorithm rsa|ed25519]` writes
  `<key_dir>/<domain>/<selector>.key` (mode 0600; owned by `user` when run as root, so the
  daemon can read it) and prints the TXT record to publish, as a zone-file line, on stdout.
  The default selector names the algorithm and the month (`rsa-202612`), so a rotation's new
  key never collides with the published one. An existing selector is never overwritten.
* `check DOMAIN` looks up `<selector>._domainkey.<domain>` TXT for each of the domain's keys
  through the configured resolver (`[relay] nameservers`; empty: the system's) and says, per
  selector, whether the published key is ours. Exit 0 when every key is published, else 1.

Exit codes as `mailhaven`'s: 0 ok, 1 operation failed, 2 usage error. SECURITY: only the
public half is printed; the private key goes to the file and nowhere else.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from mailhaven.config import Config, parse_hostport
from mailhaven.signing import keys as keystore

#: Seconds for one record's lookup (dnspython's lifetime: all tries together).
LOOKUP_TIMEOUT = 10.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mailhaven dkim", description="DKIM signing keys")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    keygen = sub.add_parser("keygen", help="make a key and print its DNS record")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", help="default: rsa-YYYYMM or ed-YYYYMM")
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    check = sub.add_parser("check", help="does DNS publish the domain's keys?")
    check.add_argument("domain")
    return parser


def _domain(text: str) -> str | None:
    from mailhaven.routing.router import normalise_domain

    norm = normalise_domain(text)
    return norm if norm and "." in norm and not norm.startswith("[") else None


def main(argv: Sequence[str], *, config: Config) -> int:
    args = _parser().parse_args(list(argv))
    domain = _domain(args.domain)
    if domain is None:
        print(f"mailhaven dkim: {args.domain!r} is not a domain name", file=sys.stderr)
        return 2
    if args.verb == "keygen":
        return keygen(config, domain, args.selector, args.algorithm)
    return check(config, domain)


def keygen(config: Config, domain: str, selector: str | None, algorithm: str) -> int:
    prefix = "rsa" if algorithm == "rsa" else "ed"
    selector = selector or f"{prefix}-{time.strftime('%Y%m', time.gmtime())}"
    key_dir = config.dkim_key_path
    try:
        key = keystore.generate(key_dir, domain, selector, "rsa" if algorithm == "rsa" else "ed25519")
    except FileExistsError:
        print(f"mailhaven dkim: {keystore.key_path(key_dir, domain, selector)} exists: a "
              "published key is never replaced; give a new --selector", file=sys.stderr)
        return 1
    except (OSError, keystore.KeyFileError) as err:
        print(f"mailhaven dkim: {err}", file=sys.stderr)
        return 1
    _hand_over(config, key)
    print(key.zone_line())
    listed = config.dkim.selectors.get(domain)
    note = (f"; add \"{selector}\" to [dkim] selectors.{domain} once the record is published"
            if listed is not None else "; mail from the domain is signed with it after a reload")
    print(f"mailhaven dkim: wrote {key.path} (mode 0600); publish the record above{note}",
          file=sys.stderr)
    return 0


def _hand_over(config: Config, key: keystore.SigningKey) -> None:
    """Run as root for a daemon that runs as `user`: the key (and its folder) become its."""
    if os.geteuid() != 0 or not config.user:
        return
    from mailhaven.runtime import privileges

    try:
        who = privileges.resolve(config.user, config.group)
        for path in (key.path.parent.parent, key.path.parent, key.path):
            os.chown(path, who.uid, who.gid)
    except (LookupError, OSError) as err:
        print(f"mailhaven dkim: warning: cannot give {key.path} to {config.user}: {err}",
              file=sys.stderr)


def check(config: Config, domain: str) -> int:
    try:
        found = keystore.domain_keys(
            config.dkim_key_path, domain, config.dkim.selectors.get(domain)
        )
    except keystore.KeyFileError as err:
        print(f"mailhaven dkim: {err}", file=sys.stderr)
        return 1
    if not found:
        print(f"mailhaven dkim: no keys for {domain} in {config.dkim_key_path} "
              f"(mailhaven dkim keygen {domain})", file=sys.stderr)
        return 1
    ok = True
    for key in found:
        verdict = compare(key, lookup_txt(config, key.record_name))
        ok = ok and verdict == "ok"
        print(f"{key.record_name}: {key.algorithm}: {_MESSAGES.get(verdict, verdict)}")
    return 0 if ok else 1


_MESSAGES = {
    "ok": "published, matches the key",
    "none": "no record published (publish the one `dkim keygen` printed)",
}


def compare(key: keystore.SigningKey, records: list[str] | str) -> str:
    """"ok", "none", or why the published record is not our key."""
    if isinstance(records, str):
        return f"lookup failed: {records}"
    dkim = [keystore.parse_record(r) for r in records if r.lstrip().startswith("v=DKIM1")
            or "p=" in r]
    if not dkim:
        return "none"
    if len(dkim) > 1:
        return "more than one DKIM record: verifiers may pick either (RFC 6376 §3.6.2.2)"
    tags = dkim[0]
    if tags.get("p", "") == "":
        return "the record is revoked (empty p=)"
    if tags.get("k", "rsa").lower() != key.algorithm:
        return f"the record says k={tags.get('k')}, the key is {key.algorithm}"
    if tags["p"] != key.public_value():
        return "the published key differs from ours (an old record, or another key)"
    return "ok"


def lookup_txt(config: Config, name: str) -> list[str] | str:
    """The TXT strings at `name` (each record's strings joined), or why there are none."""
    import dns.exception
    import dns.nameserver
    import dns.resolver

    if config.relay.nameservers:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(*parse_hostport(n)) for n in config.relay.nameservers
        ]
    else:
        resolver = dns.resolver.Resolver()
    resolver.lifetime = LOOKUP_TIMEOUT
    try:
        answer = resolver.resolve(name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.Timeout:
        return "timeout"
    except dns.resolver.NoNameservers:
        return "server failure"
    except dns.exception.DNSException as err:
        return str(err)
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]
