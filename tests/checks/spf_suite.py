"""The openspf.org RFC 7208 test suite (shipped by Debian's python3-spf) as a zone for
`checks.spf`: `load_suite()` yields (section, name, case, zone) and `SuiteZone` answers
lookups from the suite's zone data the way the suite's own drivers do (pyspf's testspf.py):
`SPF` records also answer TXT queries unless the name has `TXT: NONE`; `TIMEOUT` makes
every query for a type the name has no record of time out."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mailhaven.net.dns import DNSAnswer, DNSError, NoRecords, Records

SUITE = Path("/usr/share/doc/python3-spf/rfc7208-tests.yml.gz")


class SuiteZone:
    def __init__(self, zonedata: dict[str, list[Any]]) -> None:
        self.zone = {name.lower().rstrip("."): rrs for name, rrs in zonedata.items()}
        self.queries: list[tuple[str, str]] = []

    async def lookup(self, name: str, rdtype: str) -> DNSAnswer:
        self.queries.append((name, rdtype))
        return self.answer(name.lower().rstrip("."), rdtype, 0)

    def answer(self, name: str, rdtype: str, depth: int) -> DNSAnswer:
        if name not in self.zone:
            return NoRecords(True, 300)
        rrs = self.zone[name]
        values: list[str] = []
        timeout = False
        # SPF records stand in for TXT only where the name has no TXT entry of its own
        no_txt = any(isinstance(r, dict) and "TXT" in r for r in rrs)
        for rr in rrs:
            if rr == "TIMEOUT":
                timeout = True
                continue
            ((kind, value),) = rr.items()
            if kind == "CNAME" and rdtype != "CNAME" and depth < 8:
                return self.answer(str(value).lower().rstrip("."), rdtype, depth + 1)
            if kind == "SPF" and rdtype == "TXT" and not no_txt:
                kind = "TXT"
            if kind != rdtype or value == "NONE":
                continue
            if kind == "TXT":
                values.append("".join(value) if isinstance(value, list) else str(value))
            elif kind == "MX":
                values.append(str(value[1]).lower().rstrip("."))
            else:
                values.append(str(value).lower().rstrip(".") if kind == "PTR" else str(value))
        if values:
            return Records(tuple(values), 300)
        if timeout:
            return DNSError("timeout")
        return NoRecords(False, 300)


def load_suite() -> Iterator[tuple[str, str, dict[str, Any], dict[str, list[Any]]]]:
    import yaml

    with gzip.open(SUITE, "rt", encoding="utf-8") as f:
        for section in yaml.safe_load_all(f):
            for name, case in section["tests"].items():
                yield section["description"], name, case, section["zonedata"]
