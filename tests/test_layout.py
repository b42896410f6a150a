"""The tests mirror the source tree: `tests/<package>/test_<module>.py` tests
`src/mailhaven/<package>/<module>.py` (or the package `<module>/`), so a module's tests are found
by its name. End-to-end tests (`tests/e2e/`) are named by scenario; the files below by topic."""

from __future__ import annotations

from pathlib import Path

TESTS = Path(__file__).parent
SOURCE = TESTS.parent / "src" / "mailhaven"

#: Test files that test no single module, and why.
BY_TOPIC = {
    "test_layout.py": "this check",
    "checks/test_spf_interop.py": "checks.spf against Mail::SPF, record by record",
    "contrib/test_systemd_unit.py": "contrib/systemd, not a module",
    "proto/test_fuzz_pop3.py": "fuzzing proto.pop3",
    "proto/test_fuzz_smtp_client.py": "fuzzing proto.smtp_client",
    "proto/test_fuzz_smtp_server.py": "fuzzing proto.smtp_server",
    "proto/test_lmtp.py": "the LMTP mode of proto.smtp_server and proto.smtp_client",
    "proto/test_properties.py": "hypothesis properties of proto.address and proto.body",
    # left to merge into the file of their module (not a plain rename):
    "delivery/test_local_quota.py": "delivery.local with quotas; own helpers, see test_local.py",
    "scheduler/test_fastpath.py": "scheduler.runner with the active queue",
}


def module_under_test(test: Path) -> Path | None:
    """The source module a test file is named after, if it exists."""
    rel = test.relative_to(TESTS)
    name = rel.name.removeprefix("test_").removesuffix(".py")
    for candidate in (SOURCE / rel.parent / f"{name}.py", SOURCE / rel.parent / name / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def test_every_test_file_is_named_after_a_module() -> None:
    unnamed = [
        str(test.relative_to(TESTS))
        for test in sorted(TESTS.rglob("test_*.py"))
        if test.relative_to(TESTS).parts[0] != "e2e"
        and str(test.relative_to(TESTS)) not in BY_TOPIC
        and module_under_test(test) is None
    ]
    assert unnamed == [], "name them tests/<package>/test_<module>.py, or list them in BY_TOPIC"


def test_the_topic_list_names_only_files_that_exist() -> None:
    assert [name for name in BY_TOPIC if not (TESTS / name).exists()] == []
