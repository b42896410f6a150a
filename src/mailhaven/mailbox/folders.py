"""Maildir++ folders on delivery: which folder of a user's Maildir a copy goes to.

Role: given the user's Maildir, the recipient address as it was written and what the checks
said about the message, pick the INBOX (the Maildir itself) or a Maildir++ subfolder `.Name/`
(the layout Dovecot's `maildir:` with its default `.` separator and Courier use; `.a.b` is the
folder `a/b`). Pure decisions plus two small file-system helpers; no SMTP, no queue.

Rules (what Dovecot's `lmtp_save_to_detail_mailbox` and the usual Sieve Junk rule do):

* Spam (the checks marked the envelope, see `is_spam`) goes to the junk folder when one is
  configured; that folder is created (and subscribed, so IMAP clients show it) when missing.
* A plus address `alice+lists@` goes to `.lists` when plus folders are on and that folder
  exists (exact name first, then the one folder whose name matches ignoring case). It is never
  created: anyone can write any extension, and a folder per extension would be a way to litter
  a mailbox. Otherwise: the INBOX.

Trust: the extension comes from the sender. It is only ever compared against names read from the
Maildir (plus a strict syntax check), so `../x`, `/`, NUL or a leading dot cannot name a path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from mailhaven.mailbox.maildir import ensure_maildir
from mailhaven.mailbox.owner import MailOwner

#: The Maildir++ marker file inside a subfolder (Courier and Dovecot create it; Courier's
#: tools use it to find the parent's maildirsize).
FOLDER_MARKER = "maildirfolder"
#: Dovecot's list of subscribed folders, one name a line, in the Maildir's root.
SUBSCRIPTIONS = "subscriptions"
#: Envelope flag the filtering checks set on a message they judged to be spam (the hook; e.g.
#: an rspamd "add header" action or a DNSBL score sets `extra["spam"] = "yes"`).
SPAM_FLAG = "spam"
#: A folder name is at most this long (Dovecot's MAILBOX_LIST_NAME_MAX_LENGTH is 4096 for the
#: whole name; one file-name component is at most 255 bytes, the dot included).
MAX_FOLDER_NAME = 254
_BAD_CHARS = frozenset("/\\\0~%*") | frozenset(chr(c) for c in (*range(32), 127))


@dataclass(frozen=True, slots=True)
class FolderRules:
    #: `user+ext@` goes to `.ext` when that folder exists.
    plus_folders: bool = True
    #: Characters that start the extension (Postfix recipient_delimiter); empty: no extensions.
    delimiters: str = "+"
    #: Folder for messages the checks marked as spam; empty: they go to the INBOX.
    junk: str = "Junk"


def is_spam(extra: Mapping[str, str]) -> bool:
    return extra.get(SPAM_FLAG, "").lower() in ("yes", "true", "1")


def valid_folder_name(name: str) -> bool:
    """A Maildir++ folder name we can use as `.name`: no path syntax, no empty levels."""
    return (
        bool(name)
        and len(name.encode("utf-8")) <= MAX_FOLDER_NAME
        and not any(ch in _BAD_CHARS for ch in name)
        and all(part for part in name.split("."))
    )


def extension(address: str, delimiters: str) -> str | None:
    """`alice+lists@x` -> `lists`; None without an extension (the delimiter at position 0 does
    not count, as in Postfix)."""
    local = address.strip().strip("<>").rpartition("@")[0] or address
    for i, ch in enumerate(local):
        if i and ch in delimiters:
            return local[i + 1 :] or None
    return None


def existing_folder(maildir: Path, name: str) -> Path | None:
    """The folder `.name` of the Maildir if it exists (exact, else the single case-insensitive
    match); never anything outside the Maildir."""
    if not valid_folder_name(name):
        return None
    exact = maildir / f".{name}"
    if (exact / "new").is_dir():
        return exact
    wanted = f".{name}".lower()
    matches = []
    with contextlib.suppress(OSError), os.scandir(maildir) as it:
        for entry in it:
            if entry.name.lower() == wanted and entry.is_dir(follow_symlinks=False):
                matches.append(maildir / entry.name)
    if len(matches) == 1 and (matches[0] / "new").is_dir():
        return matches[0]
    return None


def choose(maildir: Path, recipient: str, extra: Mapping[str, str], rules: FolderRules) -> Path:
    """The directory (a Maildir) to deliver this copy into; see the module doc."""
    if rules.junk and is_spam(extra) and valid_folder_name(rules.junk):
        return maildir / f".{rules.junk}"
    if rules.plus_folders and rules.delimiters:
        ext = extension(recipient, rules.delimiters)
        if ext is not None:
            found = existing_folder(maildir, ext)
            if found is not None:
                return found
    return maildir


def prepare_folder(maildir: Path, folder: Path, owner: MailOwner | None = None) -> None:
    """Make a subfolder usable before the first delivery into it: its marker file and an
    entry in `subscriptions` (the Maildir's own directories are made by the writer)."""
    if folder == maildir:
        return
    marker = folder / FOLDER_MARKER
    if marker.exists():
        return
    ensure_maildir(folder, owner)  # durable before a 250 depends on it
    _close_owned(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600), owner)
    name = folder.name[1:]
    subs = maildir / SUBSCRIPTIONS
    try:
        listed = subs.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        listed = []
    if name not in listed:
        fd = os.open(subs, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{name}\n".encode())
        finally:
            _close_owned(fd, owner)


def _close_owned(fd: int, owner: MailOwner | None) -> None:
    """Give a file we made to the mail owner (Dovecot must be able to rewrite it), close it."""
    try:
        if owner is not None:
            owner.apply_to_fd(fd)
    finally:
        os.close(fd)
