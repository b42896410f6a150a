"""Fixtures for the sans-I/O protocol cores.

`bytewise` runs a test twice: with its input fed whole and one byte at a time (ids `[whole]`,
`[bytewise]`); a core must give the same events either way, since TCP may split anywhere.
"""

from __future__ import annotations

import pytest


@pytest.fixture(params=["whole", "bytewise"])
def bytewise(request: pytest.FixtureRequest) -> bool:
    return bool(request.param == "bytewise")
