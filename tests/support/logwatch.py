"""Reading a server's log from a test: the whole text, its tail, waiting for a line.

`LogWatch` is mixed into each server a test runs (`MailServer`, `PostfixInstance`): the class
says how to read its log (`log()`) and what to call it in a failure message (`log_name`).
"""

from __future__ import annotations

import re
import time

#: seconds between two reads of the log while waiting
POLL = 0.02


class LogWatch:
    log_name = "log"

    def log(self) -> str:  # pragma: no cover - each server reads its own file
        raise NotImplementedError

    def log_lines(self) -> list[str]:
        return self.log().splitlines()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_lines()[-lines:])

    def wait_for_log(
        self, pattern: str, *, count: int = 1, timeout: float = 10.0
    ) -> list[re.Match[str]]:
        """Wait until `pattern` (a regex, searched per line) matches at least `count` lines."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            matches = [m for line in self.log_lines() if (m := regex.search(line))]
            if len(matches) >= count:
                return matches
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.log_name} has {len(matches)} line(s) matching {pattern!r}, wanted"
                    f" {count}\n{self.log_tail()}"
                )
            time.sleep(POLL)
