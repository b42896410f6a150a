"""End to end: the state directory and mailboxes are private, and a world-readable spool
stops the server with a clear message (issue 16, item 23)."""

from __future__ import annotations

import os
import stat

import pytest
from tests.e2e.conftest import ServerFactory
from tests.support.server import ServerError

pytestmark = pytest.mark.e2e


def _mode(path: os.PathLike[str]) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_state_is_private_and_an_exposed_spool_is_refused(mail_server: ServerFactory) -> None:
    server = mail_server(settings={"local_users": ["postmaster"]})
    state = server.state_dir
    assert _mode(state) & 0o007 == 0, oct(_mode(state))
    assert _mode(state / "mail") == 0o700
    assert _mode(state / "spool") == 0o700
    server.stop()
    os.chmod(state / "spool", 0o755)
    with pytest.raises(ServerError):
        server.start()
    log = server.log()
    assert "accessible to every user" in log and "chmod o-rwx" in log, log
    assert "Traceback" not in log, log
