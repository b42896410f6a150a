"""Folders on delivery: plus addresses to existing folders, spam to Junk, nothing outside."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhaven.mailbox import folders
from mailhaven.mailbox.folders import FolderRules
from mailhaven.mailbox.maildir import ensure_maildir

RULES = FolderRules(plus_folders=True, delimiters="+", junk="Junk")


@pytest.fixture
def box(tmp_path: Path) -> Path:
    path = tmp_path / "alice"
    ensure_maildir(path)
    ensure_maildir(path / ".lists")
    ensure_maildir(path / ".Work.Reports")
    return path


def test_plus_address_to_existing_folder(box: Path) -> None:
    assert folders.choose(box, "alice+lists@a.example", {}, RULES) == box / ".lists"
    assert folders.choose(box, "<alice+LISTS@a.example>", {}, RULES) == box / ".lists"
    assert folders.choose(box, "alice+Work.Reports@a.example", {}, RULES) == box / ".Work.Reports"


@pytest.mark.parametrize(
    "rcpt",
    [
        "alice@a.example",
        "alice+nothere@a.example",
        "alice+@a.example",
        "alice+../../bob@a.example",
        "alice+/etc@a.example",
        "alice+.lists@a.example",
        "alice+lists.@a.example",
        "alice+a\x00b@a.example",
        "alice+" + "x" * 300 + "@a.example",
        "+lists@a.example",  # a delimiter at position 0 starts no extension
    ],
)
def test_anything_else_goes_to_the_inbox(box: Path, rcpt: str) -> None:
    assert folders.choose(box, rcpt, {}, RULES) == box


def test_plus_folders_can_be_off(box: Path) -> None:
    off = FolderRules(plus_folders=False, delimiters="+", junk="Junk")
    assert folders.choose(box, "alice+lists@a.example", {}, off) == box
    no_delimiter = FolderRules(plus_folders=True, delimiters="", junk="Junk")
    assert folders.choose(box, "alice+lists@a.example", {}, no_delimiter) == box


def test_spam_goes_to_junk_which_is_made_and_subscribed(box: Path) -> None:
    target = folders.choose(box, "alice+lists@a.example", {"spam": "yes"}, RULES)
    assert target == box / ".Junk"
    folders.prepare_folder(box, target)
    folders.prepare_folder(box, target)  # idempotent
    assert (target / "maildirfolder").is_file()
    assert all((target / sub).is_dir() for sub in ("tmp", "new", "cur"))
    assert (box / "subscriptions").read_text() == "Junk\n"
    no_junk = FolderRules(plus_folders=True, delimiters="+", junk="")
    assert folders.choose(box, "alice@a.example", {"spam": "yes"}, no_junk) == box
    assert folders.choose(box, "alice@a.example", {"spam": "no"}, RULES) == box


def test_ambiguous_case_match_is_not_guessed(box: Path) -> None:
    ensure_maildir(box / ".News")
    ensure_maildir(box / ".NEWS")
    assert folders.choose(box, "alice+news@a.example", {}, RULES) == box
    assert folders.choose(box, "alice+News@a.example", {}, RULES) == box / ".News"


def test_extension() -> None:
    assert folders.extension("alice+x+y@d", "+") == "x+y"
    assert folders.extension("alice-x@d", "+-") == "x"
    assert folders.extension("alice@d", "+") is None
