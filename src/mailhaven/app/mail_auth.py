"""Wiring for the MX port's mail authentication: `[inbound_auth]` -> `smtpd.inbound_gate`.

In: the configuration, the resolver (the relay's: `[relay] nameservers`, so tests and operators
point every lookup at one place) and the spool (fresh writers keep the queue id when forged
headers are removed). Out: the `InboundGate` for the MX profile, or None when checks are off
for every domain. The Public Suffix List is loaded once per process (it takes a noticeable
moment) and shared across reloads.
"""

from __future__ import annotations

import functools

from mailhaven.checks.dmarc import OrgDomains
from mailhaven.checks.inbound import DomainPolicy, InboundChecks, InboundSettings, TempAction
from mailhaven.config import Config, InboundAuth, InboundAuthDomain
from mailhaven.net.dns import Resolver
from mailhaven.smtpd.inbound_gate import InboundGate
from mailhaven.spool.message_writer import MessageWriter
from mailhaven.spool.store import Spool


@functools.cache
def org_domains() -> OrgDomains:
    return OrgDomains()


def _temp(text: str) -> TempAction:
    return "defer" if text == "defer" else "accept"


def domain_policy(auth: InboundAuth, over: InboundAuthDomain | None = None) -> DomainPolicy:
    """The global policy, with a domain's overrides (a key it leaves out keeps the global)."""
    base = DomainPolicy(
        checks=auth.checks,
        dmarc_reject=auth.dmarc_reject,
        spf_reject=auth.spf_reject,
        temperror=_temp(auth.temperror),
        quarantine_header=auth.quarantine_header,
    )
    if over is None:
        return base
    return DomainPolicy(
        checks=base.checks if over.checks is None else over.checks,
        dmarc_reject=base.dmarc_reject if over.dmarc_reject is None else over.dmarc_reject,
        spf_reject=base.spf_reject if over.spf_reject is None else over.spf_reject,
        temperror=_temp(over.temperror) if over.temperror else base.temperror,
        quarantine_header=(
            base.quarantine_header if over.quarantine_header is None else over.quarantine_header
        ),
    )


def inbound_settings(config: Config) -> InboundSettings:
    auth = config.inbound_auth
    return InboundSettings(
        authserv_id=config.hostname,
        default=domain_policy(auth),
        domains={d.lower(): domain_policy(auth, o) for d, o in auth.domains.items()},
        max_verify_size=auth.max_verify_size,
    )


def inbound_gate(config: Config, resolver: Resolver, spool: Spool) -> InboundGate | None:
    settings = inbound_settings(config)
    if not settings.default.checks and not any(p.checks for p in settings.domains.values()):
        return None
    checks = InboundChecks(
        settings, resolver, trusted=config.trusted_networks, orgs=org_domains()
    )
    return InboundGate(
        checks, lambda qid: MessageWriter(qid, spool.tmp_dir, spool.inline_limit)
    )
