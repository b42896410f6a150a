"""checks.spf against Mail::SPF (Debian's libmail-spf-perl, the library behind `spfquery`):
both evaluate the same records, served by the tests' loopback DNS server, and must agree."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from tests.support.dns_server import DNSServer

from mailhaven.checks import spf
from mailhaven.net.dns import Resolver

#: Mail::SPF with its resolver pointed at our server (it would read /etc/resolv.conf).
PERL = r"""
use strict; use Mail::SPF; use Net::DNS::Resolver;
my ($port, $ip, $scope, $identity, $helo) = @ARGV;
my $dns = Net::DNS::Resolver->new(nameservers => ['127.0.0.1'], port => $port, retry => 1,
                                  udp_timeout => 5, tcp_timeout => 5, recurse => 1);
my $server = Mail::SPF::Server->new(dns_resolver => $dns, max_void_dns_lookups => 2);
my $request = Mail::SPF::Request->new(scope => $scope, identity => $identity,
                                      ip_address => $ip, helo_identity => $helo);
print $server->process($request)->code, "\n";
"""

ZONE = {
    "pass.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/64 -all"]},
    "inc.test": {"TXT": ["v=spf1 include:pass.test ~all"]},
    "redir.test": {"TXT": ["v=spf1 redirect=pass.test"]},
    "exists.test": {"TXT": ["v=spf1 exists:%{ir}.%{l}._spf.%{d} -all"]},
    "10.2.0.192.alice._spf.exists.test": {"A": ["127.0.0.2"]},
    "a.test": {"TXT": ["v=spf1 a/28 a:six.a.test//48 -all"], "A": ["198.51.100.1"]},
    "six.a.test": {"AAAA": ["2001:db8:aaaa::1"]},
    "mx.test": {"TXT": ["v=spf1 mx:mx.test/30 ?all"], "MX": [(10, "m1.mx.test")]},
    "m1.mx.test": {"A": ["203.0.113.5"]},
    "soft.test": {"TXT": ["v=spf1 ~all"]},
    "neutral.test": {"TXT": ["v=spf1 ?all"]},
    "syntax.test": {"TXT": ["v=spf1 ip4:192.0.2.300 -all"]},
    "loop.test": {"TXT": ["v=spf1 include:loop.test -all"]},
    "many.test": {"TXT": ["v=spf1 " + " ".join(f"include:n{i}.many.test" for i in range(11))
                          + " -all"]},
    **{f"n{i}.many.test": {"TXT": ["v=spf1 -all"]} for i in range(11)},
    "void.test": {"TXT": ["v=spf1 a:x1.void.test a:x2.void.test a:x3.void.test +all"]},
    "twovoid.test": {"TXT": ["v=spf1 a:x1.void.test a:x2.void.test +all"]},
    "noinc.test": {"TXT": ["v=spf1 include:nothing.test -all"]},
    "norecord.test": {"A": ["192.0.2.1"]},
    "helo.test": {"TXT": ["v=spf1 a -all"], "A": ["192.0.2.10"]},
    "broken.test": {"TXT": ["v=spf1 include:servfail.test -all"]},
}

CASES = [  # (client ip, MAIL FROM)
    ("192.0.2.10", "alice@pass.test"), ("198.51.100.9", "alice@pass.test"),
    ("2001:db8::5", "alice@pass.test"), ("2001:db8:0:1::5", "alice@pass.test"),
    ("192.0.2.10", "alice@inc.test"), ("198.51.100.9", "alice@inc.test"),
    ("192.0.2.10", "alice@redir.test"), ("198.51.100.9", "alice@redir.test"),
    ("192.0.2.10", "alice@exists.test"), ("192.0.2.10", "bob@exists.test"),
    ("198.51.100.14", "x@a.test"), ("198.51.100.17", "x@a.test"),
    ("2001:db8:aaaa:ffff::1", "x@a.test"), ("2001:db8:aaab::1", "x@a.test"),
    ("203.0.113.6", "x@mx.test"), ("203.0.113.9", "x@mx.test"),
    ("192.0.2.10", "x@soft.test"), ("192.0.2.10", "x@neutral.test"),
    ("192.0.2.10", "x@syntax.test"), ("192.0.2.10", "x@loop.test"),
    ("192.0.2.10", "x@many.test"), ("192.0.2.10", "x@void.test"),
    ("192.0.2.10", "x@twovoid.test"), ("192.0.2.10", "x@noinc.test"),
    ("192.0.2.10", "x@norecord.test"), ("192.0.2.10", "x@nxdomain.test"),
    ("192.0.2.10", "x@broken.test"),
]  # fmt: skip


def have_mail_spf() -> bool:
    if shutil.which("perl") is None:
        return False
    return subprocess.run(["perl", "-MMail::SPF", "-e", "1"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def server() -> object:
    with DNSServer(ZONE, servfail={"servfail.test"}) as s:
        yield s


@pytest.mark.skipif(not have_mail_spf(), reason="Mail::SPF (libmail-spf-perl) is not installed")
@pytest.mark.parametrize(("ip", "sender"), CASES)
async def test_results_agree_with_mail_spf(
    server: DNSServer, ip: str, sender: str, tmp_path: Path
) -> None:
    port = server.address[1]
    theirs = subprocess.run(
        ["perl", "-e", PERL, str(port), ip, "mfrom", sender, "helo.test"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    resolver = Resolver(nameservers=[server.address], timeout=5)
    ours = await spf.check_mailfrom(resolver, ip, sender, "helo.test")
    assert theirs.stdout.strip() == ours.result, (theirs.stderr, ours)


@pytest.mark.skipif(not have_mail_spf(), reason="Mail::SPF (libmail-spf-perl) is not installed")
async def test_the_helo_identity_agrees_with_mail_spf(server: DNSServer) -> None:
    port = server.address[1]
    resolver = Resolver(nameservers=[server.address], timeout=5)
    for ip in ("192.0.2.10", "192.0.2.11"):
        theirs = subprocess.run(["perl", "-e", PERL, str(port), ip, "helo", "helo.test",
                                 "helo.test"], capture_output=True, text=True, timeout=60)  # fmt: skip
        ours = await spf.check_helo(resolver, ip, "helo.test")
        assert theirs.stdout.strip() == ours.result
