"""checks.authresults: our field parses with authres; forged fields are found exactly."""

from __future__ import annotations

import authres
import authres.core

from mailhaven.checks import authresults
from mailhaven.checks.arc_verify import ARCResult
from mailhaven.checks.dkim_verify import DKIMResult
from mailhaven.checks.dmarc import DMARCResult
from mailhaven.checks.spf import SPFResult


def parse(field: bytes) -> authres.AuthenticationResultsHeader:
    text = field.decode().replace("\r\n\t", " ").rstrip("\r\n")
    return authres.core.AuthenticationResultsHeader.parse(authres.all_features(), text)


def test_our_field_round_trips_through_authres() -> None:
    field = authresults.header_field("mx.example.org", [
        authresults.spf_clause(SPFResult("pass", "example.com", "example.com: ip4:192.0.2.0/24 matched"),
                               "mailfrom", 'we"ird (user)@example.com'),
        *authresults.dkim_clauses([
            DKIMResult("pass", "example.com", "sel", "@example.com", "rsa-sha256", "abcdefgh"),
            DKIMResult("fail", "other.test", "s2", "", "ed25519-sha256", "zzzzzz", "body hash did not verify"),
        ]),
        authresults.dmarc_clause(DMARCResult("pass", "example.com", "reject", "none")),
        authresults.arc_clause(ARCResult("fail", 2, "ARC-Seal[1] did not validate (really)")),
    ])  # fmt: skip
    assert field.startswith(b"Authentication-Results: mx.example.org;\r\n\tspf=pass")
    parsed = parse(field)
    assert parsed.authserv_id == "mx.example.org"
    methods = [(r.method, r.result) for r in parsed.results]
    assert methods == [("spf", "pass"), ("dkim", "pass"), ("dkim", "fail"), ("dmarc", "pass"),
                       ("arc", "fail")]  # fmt: skip
    assert parsed.results[1].header_d == "example.com"
    assert all(len(line) < 200 for line in field.split(b"\r\n"))


def test_control_characters_never_reach_the_field() -> None:
    clause = authresults.spf_clause(SPFResult("none", "x", "a\r\nInjected: yes"), "mailfrom",
                                    "a\r\nBcc: victim@example.com")  # fmt: skip
    assert "\r" not in clause and "\n" not in clause


HEADER = (
    b"Received: from a\r\n"
    b"Authentication-Results: MX.Example.org; dkim=pass header.d=bank.test\r\n"
    b"Authentication-Results: (forged\r\n\t(nested)) mx.example.org 1;\r\n\tspf=pass\r\n"
    b"Authentication-Results: mx.example.org.evil.test; dkim=pass\r\n"
    b"authentication-results : other.example; spf=fail\r\n"
    b"X-Authentication-Results: mx.example.org; spf=pass\r\n"
    b"Authentication-Results: \r\n"
    b"Subject: x\r\n\r\n"
    b"Authentication-Results: mx.example.org; in the body\r\n"
)


def test_forged_fields_with_our_id_are_found_and_removed() -> None:
    spans = authresults.forged_fields(HEADER, "mx.example.org")
    assert len(spans) == 2
    out = authresults.strip_fields(HEADER, spans)
    assert b"bank.test" not in out and b"(nested)" not in out
    assert b"mx.example.org.evil.test" in out and b"other.example" in out
    assert b"X-Authentication-Results" in out and b"in the body" in out
    assert out.startswith(b"Received: from a\r\nAuthentication-Results: mx.example.org.evil")


def test_authserv_id() -> None:
    assert authresults.authserv_id(b" (c) (d (e)) host.example 1; none") == b"host.example"
    assert authresults.authserv_id(b" host.example;spf=pass") == b"host.example"
    assert authresults.authserv_id(b"   ") is None
    assert authresults.authserv_id(b"(unterminated") is None
