"""Fixtures for the end-to-end tests: real `mailhaven serve` processes on loopback ports.

`mail_server(**kwargs)` makes a `tests.support.server.MailServer` in its own directory under the
test's tmp_path and starts it (pass `start=False` to configure first); every server it made is
stopped (SIGTERM, then SIGKILL) at teardown, so no test leaves a process behind.

`dns` serves the test module's `RECORDS` (tests.support.dns_server), one server per module.

`pytest.mark.both_loops` (tests/conftest.py) runs an async test on both event loops.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
from tests.support import opendkim, rspamd
from tests.support.dns_server import DNSServer
from tests.support.milter import TestMilter
from tests.support.server import MailServer, behind_milter


class ServerFactory(Protocol):
    def __call__(self, *, start: bool = True, **kwargs: Any) -> MailServer: ...


def _factory(base: Path, made: list[MailServer]) -> ServerFactory:
    def make(*, start: bool = True, **kwargs: Any) -> MailServer:
        server = MailServer(base / f"mailhaven-{len(made)}", **kwargs)
        made.append(server)
        if start:
            server.start()
        return server

    return make


@pytest.fixture
def mail_server(tmp_path: Path) -> Iterator[ServerFactory]:
    made: list[MailServer] = []
    yield _factory(tmp_path, made)
    for server in made:
        server.stop()


@pytest.fixture(scope="module")
def module_mail_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerFactory]:
    """Like `mail_server`, for servers shared by the tests of one module."""
    made: list[MailServer] = []
    yield _factory(tmp_path_factory.mktemp("shared"), made)
    for server in made:
        server.stop()


@pytest.fixture(scope="session")
def swaks() -> str:
    path = shutil.which("swaks")
    if path is None:
        pytest.skip("swaks is not installed (scripts/install-test-deps)")
    return path


@pytest.fixture(scope="session")
def pflogsumm() -> str:
    path = shutil.which("pflogsumm") or (
        "/usr/sbin/pflogsumm" if Path("/usr/sbin/pflogsumm").exists() else None
    )
    if path is None:
        pytest.skip("pflogsumm is not installed (scripts/install-test-deps)")
    return path


@pytest.fixture(scope="module")
def dns(request: pytest.FixtureRequest) -> Iterator[DNSServer]:
    """The tests' DNS server answering the requesting module's `RECORDS` zone.

    A module whose zone needs more (names that fail or stay silent, keys made at run time)
    defines its own `dns`, which takes precedence.
    """
    with DNSServer(request.module.RECORDS) as server:
        yield server


# -- milters the e2e tests attach (module scope: one per test module that asks) -------------


@pytest.fixture(scope="module")
def milter() -> Iterator[TestMilter]:
    """The tests' own scriptable milter (`tests.support.milter`)."""
    with TestMilter() as running:
        yield running


@pytest.fixture
def fresh_script(milter: TestMilter) -> None:
    """`milter` with no replies scripted: a module whose tests each script their own marks
    itself `pytest.mark.usefixtures("fresh_script")`."""
    milter.replies.clear()


@pytest.fixture(scope="module")
def scanner() -> Iterator[rspamd.RspamdInstance]:
    """A private rspamd in milter mode (`tests.support.rspamd`)."""
    with rspamd.milter_for_tests() as instance:
        yield instance


class Scanner(Protocol):
    """A running milter peer (rspamd, SpamAssassin, ClamAV, ...) at `spec` ("inet:host:port")."""

    @property
    def spec(self) -> str: ...


@pytest.fixture(scope="module")
def milter_mx(scanner: Scanner, module_mail_server: ServerFactory) -> MailServer:
    """A mail server with `scanner` as its smtpd milter: example.org, users postmaster, alice.
    `scanner` is rspamd unless the module defines its own (SpamAssassin, ClamAV)."""
    return module_mail_server(settings=behind_milter(scanner.spec))


@pytest.fixture(scope="module")
def signer() -> Iterator[opendkim.OpenDKIMInstance]:
    """A private OpenDKIM signing for example.org; the module is skipped where it is missing."""
    reason = opendkim.skip_reason()
    if reason:
        pytest.skip(reason)
    with opendkim.OpenDKIMInstance("example.org") as instance:
        yield instance
