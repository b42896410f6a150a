"""Mailbox names and paths: canonical full addresses, and nothing else becomes a path."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailhaven.mailbox.layout import canonical_name, mailbox_path, normalize_domain, split_name

BAD = [
    "", " ", "a/b@x", "a@x/y", "../a@x", "a@..", "a@x..y", "..", "a\0b@x", "a@x\0", "a" * 300,
    "a" * 65 + "@x", "a@" + "b" * 64 + ".example", "a@" + ("b" * 60 + ".") * 5, "@x", "a@",
    "a b@x", "a@b c", ".a@x", "a.@x", "a..b@x", "a@-x", "a%b@x", "a!b@x", 'a"b@x', "a\n@x",
]


@pytest.mark.parametrize("name", BAD)
def test_bad_names_are_refused(name: str, tmp_path: Path) -> None:
    assert canonical_name(name) is None
    with pytest.raises(ValueError):
        mailbox_path(tmp_path, name)


@pytest.mark.parametrize(
    ("login", "canonical"),
    [
        ("Alice@A.Example", "alice@a.example"),
        ("alice@a.example.", "alice@a.example"),
        (" alice@a.example ", "alice@a.example"),
        ("ALICE", "alice"),
        ("alice@BÜCHER.example", "alice@xn--bcher-kva.example"),
        ("\uff41\uff4c\uff49\uff43\uff45@a.example", "alice@a.example"),  # NFKC: full-width
        ("a+b.c@x", "a+b.c@x"),
    ],
)
def test_canonical(login: str, canonical: str) -> None:
    assert canonical_name(login) == canonical


def test_paths_stay_inside_their_domain(tmp_path: Path) -> None:
    assert mailbox_path(tmp_path, "alice@a.example") == tmp_path / "a.example" / "alice"
    for user in ("new", "cur", "tmp"):
        assert mailbox_path(tmp_path, f"{user}@a.example").parent == tmp_path / "a.example"
    with pytest.raises(ValueError):
        mailbox_path(tmp_path, "alice")  # bare names have no place in the layout
    with pytest.raises(ValueError):
        mailbox_path(tmp_path, "Alice@a.example")  # only canonical names


def test_split_and_domain() -> None:
    assert split_name("a@b.example") == ("a", "b.example")
    assert split_name("a") == ("a", None)
    assert normalize_domain("[192.0.2.1]") is None
    assert normalize_domain("Under_Score.example") == "under_score.example"
