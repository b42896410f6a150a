"""Outbound mail authentication from the configuration: the SRS rewriter and intake's hook.

`load_srs` reads (or, the first time, makes) the SRS secrets file; `build_outbound` loads the
DKIM keys and picks the ARC sealing key. Both raise `ConfigError` naming the file and the
reason, so start-up and reload refuse what cannot be used (a reload then keeps the old hook).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from collections.abc import Callable

from mailhaven import config as configuration
from mailhaven.config import Config
from mailhaven.routing.srs import SRS, load_secrets
from mailhaven.signing.keys import KeyFileError, SigningKey, load_all
from mailhaven.signing.outbound import Outbound

log = logging.getLogger("mailhaven.master")


def load_srs(config: Config) -> SRS | None:
    """The SRS rewriter (`[srs]`); its secrets file is made (random, mode 0600) when it does
    not exist yet, as postsrsd's package does at install."""
    if not config.srs.enabled:
        return None
    path = config.srs_secret_path
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # another process made it first
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as out:
                    out.write(secrets.token_urlsafe(32) + "\n")
                log.info("srs: made a new secret in %s", path)
        found = load_secrets(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise configuration.ConfigError(f"srs.secret_file: {path}: {err}") from None
    if not found:
        raise configuration.ConfigError(f"srs.secret_file: {path} holds no secret")
    domain = config.srs.domain or config.local_domains[0]
    return SRS(found, domain, max_age=config.srs.max_age, hash_length=config.srs.hash_length)


def build_outbound(
    config: Config, is_local_domain: Callable[[str], bool], srs: SRS | None
) -> Outbound | None:
    """Intake's signing step from `[dkim]`, the key directory and `[srs]`; None when there is
    nothing to do."""
    dkim = config.dkim
    try:
        keys = load_all(config.dkim_key_path, dkim.selectors) if (dkim.sign or dkim.arc) else {}
    except KeyFileError as err:
        raise configuration.ConfigError(f"dkim: {err}") from None
    arc_key: SigningKey | None = None
    if dkim.arc:
        domains = [dkim.arc_domain] if dkim.arc_domain else list(config.local_domains)
        rsa = [k for d in domains for k in keys.get(d.lower(), ()) if k.algorithm == "rsa"]
        arc_key = rsa[0] if rsa else None
        if dkim.arc_domain and arc_key is None:
            raise configuration.ConfigError(
                f"dkim.arc_domain: {dkim.arc_domain} has no RSA key in {config.dkim_key_path}"
            )
    signing = keys if dkim.sign else {}
    if not signing and arc_key is None and srs is None:
        return None
    return Outbound(
        keys=signing,
        arc_key=arc_key,
        srs=srs,
        server_id=config.hostname,
        is_local_domain=is_local_domain,
        trusted_networks=config.trusted_networks,
        helper=dkim.helper,
    )
