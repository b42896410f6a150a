"""The one facade a listener's sessions ask: at connect, at MAIL FROM and at RCPT TO.

In: the settings (`GateSettings.from_config`), the shared services (DNS list lookups, the
greylist store, the sender limiter, an alert callback), and per session the facts a session
keeps (`ClientFacts`: address, verified name, HELO, authenticated user). Out: None (go on) or
the `Reply` to refuse with; at RCPT TO possibly an awaitable of one, when a DNS list answer is
still on its way or the greylist must be asked (the session awaits it with reading paused).

Order at RCPT TO, cheap first, as a sysadmin reads a Postfix restriction list:
1. the sender limits of an authenticated user (submission);
2. block lists (recipient, client network, sender): a match refuses, whoever asks;
3. exemptions: trusted networks, authenticated clients, and the allow lists skip the rest;
4. client checks (reverse DNS, HELO);
5. DNS lists (client score, then the sender domain's right-hand-side lists);
6. greylisting.
Only listeners with `screen` set (the MX) run steps 4-6; submission clients authenticate.

Failure: every slow step fails open (a DNS list that does not answer in `dnsbl_wait` counts as
not listing; a greylist database error lets the mail pass and is logged), so no outage of ours
or of a list turns into a refusal, let alone a 5xx.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from mailhaven import maillog
from mailhaven.checks.access_lists import (
    ALLOW,
    BLOCK,
    AccessLists,
    AddressList,
    IPNetwork,
    Verdict,
    in_networks,
    parse_network,
)
from mailhaven.checks.client_checks import ClientCheckSettings, check_client
from mailhaven.checks.dnsbl import Score
from mailhaven.checks.dnsbl_lookup import DnsblLookup, Pending
from mailhaven.checks.greylist_store import GreylistStore
from mailhaven.checks.sender_limits import SenderLimiter
from mailhaven.checks.sender_limits import Verdict as LimitVerdict
from mailhaven.config import Config
from mailhaven.net.dnslist import Site, parse_site
from mailhaven.net.ipaddr import IPAddress
from mailhaven.net.ipaddr import client_ip as parse_client_ip
from mailhaven.proto import replies as r
from mailhaven.proto.replies import Reply

log = logging.getLogger("mailhaven.checks")

Answer = Reply | None | Awaitable[Reply | None]

#: A sender domain is refused when its lists' weights add up to 1 (Postfix's
#: reject_rhsbl_sender: one listing is enough); a negative weight still lets an allow list
#: outweigh them. The client threshold is about scoring many client lists, not these.
RHS_THRESHOLD = 1
#: Sender domains whose list lookups one session keeps (memory per session stays bounded
#: however many MAIL FROM commands it sends).
MAX_SENDER_DOMAINS = 8


class ClientFacts(Protocol):
    """What the gate reads of a session (`smtpd.policy.SessionFacts` has it)."""

    @property
    def client_ip(self) -> str: ...
    @property
    def client_name(self) -> str: ...
    @property
    def helo(self) -> str: ...
    @property
    def auth_user(self) -> str | None: ...


@dataclass(frozen=True)
class GateSettings:
    access: AccessLists = field(default_factory=AccessLists)
    trusted: tuple[IPNetwork, ...] = ()
    #: run client checks, DNS lists and greylisting (the MX listener)
    screen: bool = False
    client: ClientCheckSettings = field(default_factory=ClientCheckSettings)
    dnsbl_sites: tuple[Site, ...] = ()
    dnsbl_threshold: int = 1
    rhs_sites: tuple[Site, ...] = ()
    dnsbl_wait: float = 5.0
    greylist: bool = False
    greylist_networks: tuple[IPNetwork, ...] = ()
    greylist_domains: AddressList = field(default_factory=AddressList)
    #: user-visible limits figures, for the texts
    sender_window: float = 3600.0

    @classmethod
    def from_config(cls, config: Config, *, screen: bool) -> GateSettings:
        c = config.checks
        a = c.access
        domains = [d.strip().lstrip("@.").lower() for d in c.greylist.allow_domains]
        return cls(
            access=AccessLists.build(
                client_allow=a.client_allow, client_block=a.client_block,
                sender_allow=a.sender_allow, sender_block=a.sender_block,
                recipient_allow=a.recipient_allow, recipient_block=a.recipient_block,
            ),
            trusted=tuple(parse_network(n) for n in config.trusted_networks),
            screen=screen,
            client=ClientCheckSettings(
                reject_unknown_client=c.client.reject_unknown_client,
                reject_non_fqdn_helo=c.client.reject_non_fqdn_helo,
                reject_own_helo=c.client.reject_own_helo,
                own_names=frozenset(
                    n.lower().rstrip(".") for n in (config.hostname, *config.local_domains)
                ),
            ),
            dnsbl_sites=tuple(parse_site(s) for s in c.dnsbl.sites),
            dnsbl_threshold=c.dnsbl.threshold,
            rhs_sites=tuple(parse_site(s) for s in c.dnsbl.sender_domain_sites),
            dnsbl_wait=c.dnsbl.wait,
            greylist=c.greylist.enabled,
            greylist_networks=tuple(parse_network(n) for n in c.greylist.allow_networks),
            greylist_domains=AddressList.parse([*domains, *(f".{d}" for d in domains)]),
            sender_window=c.sender_limits.window,
        )


class Screen:
    """One session's state at the gate: what is known of its client, lookups in flight."""

    __slots__ = ("address", "client_access", "client_check", "client_ip", "dnsbl", "logged",
                 "rhs", "server_ip", "trusted")

    def __init__(self, client_ip: str, address: IPAddress | None, trusted: bool,
                 client_access: Verdict | None, server_ip: str) -> None:
        self.client_ip = client_ip
        self.address = address  # parsed once, for the network lists
        self.trusted = trusted
        self.client_access = client_access
        self.server_ip = server_ip
        #: the client checks' verdict for (name, HELO), which rarely change within a session
        self.client_check: tuple[str, str, Reply | None] | None = None
        self.dnsbl: Pending | None = None
        self.rhs: dict[str, Pending] = {}
        self.logged = False


class Gate:
    """See the module docstring; one per listener kind, rebuilt on reload (services shared)."""

    def __init__(
        self,
        settings: GateSettings,
        *,
        dnsbl: DnsblLookup | None = None,
        greylist: GreylistStore | None = None,
        senders: SenderLimiter | None = None,
        alert: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.dnsbl = dnsbl
        self.greylist = greylist
        self.senders = senders
        self.alert = alert
        self._clock = clock
        self._wall = wall

    # ------------------------------------------------------------------ connect

    def connect(self, client_ip: str, server_ip: str = "") -> Screen:
        """A new client: its network's standing, and its DNS list lookups started."""
        s = self.settings
        address = parse_client_ip(client_ip)
        screen = Screen(client_ip, address, in_networks(address, s.trusted),
                        s.access.client(address), server_ip)
        if (
            s.screen and s.dnsbl_sites and self.dnsbl is not None
            and not screen.trusted and screen.client_access is None
        ):
            screen.dnsbl = self.dnsbl.client(s.dnsbl_sites, client_ip)
        return screen

    # ------------------------------------------------------------------ MAIL FROM

    def mail(self, screen: Screen, facts: ClientFacts, sender: str) -> Reply | None:
        user = facts.auth_user
        if user is not None and self.senders is not None:
            verdict = self.senders.message(user, self._clock())
            if not verdict.allowed:
                return self._limited(facts, sender, verdict)
        s = self.settings
        domain = sender.rpartition("@")[2].lower()
        wanted = s.rhs_sites and domain and domain not in screen.rhs
        if wanted and self.dnsbl is not None and self._screened(screen, facts):
            if len(screen.rhs) >= MAX_SENDER_DOMAINS:  # a session trying domain after domain
                del screen.rhs[next(iter(screen.rhs))]
            screen.rhs[domain] = self.dnsbl.domain(s.rhs_sites, domain)  # awaited at RCPT TO
        return None

    # ------------------------------------------------------------------ RCPT TO

    def rcpt(self, screen: Screen, facts: ClientFacts, sender: str, recipient: str) -> Answer:
        user = facts.auth_user
        if user is not None and self.senders is not None:
            verdict = self.senders.recipient(user, self._clock())
            if not verdict.allowed:
                return self._limited(facts, sender, verdict)
        access = self.settings.access
        rcpt_access = access.recipient(recipient)
        if rcpt_access is BLOCK:
            return r.recipient_access_denied(recipient)
        if screen.client_access is BLOCK:
            return r.client_access_denied(maillog.client_label(facts.client_ip, facts.client_name))
        sender_access = access.sender(sender)
        if sender_access is BLOCK:
            return r.sender_access_denied(sender)
        if ALLOW in (rcpt_access, sender_access) or not self._screened(screen, facts):
            return None
        s = self.settings
        if s.client.enabled:
            known = screen.client_check
            if known is None or known[:2] != (facts.client_name, facts.helo):
                refusal = check_client(
                    s.client, client_ip=facts.client_ip, client_name=facts.client_name,
                    helo=facts.helo, own_addresses=(screen.server_ip,),
                )
                known = screen.client_check = (facts.client_name, facts.helo, refusal)
            if known[2] is not None:
                return known[2]
        slow = self._fast_lists(screen, sender)
        if isinstance(slow, Reply):
            return slow
        if slow or (s.greylist and self.greylist is not None):
            return self._slow(screen, facts, sender, recipient)
        return None

    def _screened(self, screen: Screen, facts: ClientFacts) -> bool:
        """Does this client get the MX's checks (not trusted, not authenticated, not allowed)?"""
        return (
            self.settings.screen and not screen.trusted and facts.auth_user is None
            and screen.client_access is not ALLOW
        )

    def _fast_lists(self, screen: Screen, sender: str) -> Reply | bool:
        """The DNS list verdict when every answer is in already; True when one is awaited."""
        waiting = False
        if screen.dnsbl is not None:
            score = screen.dnsbl.ready_score()
            if score is None:
                waiting = True
            elif (refusal := self._client_listed(screen, score)) is not None:
                return refusal
        pending = screen.rhs.get(sender.rpartition("@")[2].lower())
        if pending is not None:
            score = pending.ready_score()
            if score is None:
                waiting = True
            elif (refusal := self._domain_listed(screen, sender, score)) is not None:
                return refusal
        return waiting

    async def _slow(self, screen: Screen, facts: ClientFacts, sender: str,
                    recipient: str) -> Reply | None:
        wait = self.settings.dnsbl_wait
        if screen.dnsbl is not None:
            refusal = self._client_listed(screen, await screen.dnsbl.score(wait))
            if refusal is not None:
                return refusal
        pending = screen.rhs.get(sender.rpartition("@")[2].lower())
        if pending is not None:
            refusal = self._domain_listed(screen, sender, await pending.score(wait))
            if refusal is not None:
                return refusal
        if self.settings.greylist and self.greylist is not None:
            return await self._greylist(screen, facts, sender, recipient)
        return None

    # ------------------------------------------------------------------ verdicts

    def _client_listed(self, screen: Screen, score: Score) -> Reply | None:
        assert screen.dnsbl is not None
        self._log_lists(screen, screen.dnsbl, score, f"client [{screen.client_ip}]")
        if not score.blocks(self.settings.dnsbl_threshold) or score.named is None:
            return None  # (a score that blocks always names its list)
        return r.client_blocklisted(screen.client_ip, score.named)

    def _domain_listed(self, screen: Screen, sender: str, score: Score) -> Reply | None:
        domain = sender.rpartition("@")[2].lower()
        if not score.blocks(RHS_THRESHOLD) or score.named is None:
            return None
        return r.sender_domain_blocklisted(domain, score.named)

    def _log_lists(self, screen: Screen, pending: Pending, score: Score, what: str) -> None:
        """Once per session: which lists listed the client, and which gave odd or no answers."""
        if screen.logged:
            return
        screen.logged = True
        for odd in score.ignored:
            log.warning("dnsbl: %s: answer outside 127.0.0.0/8 ignored: %s", what, odd)
        if pending.unanswered:
            log.info("dnsbl: %s: not counted: %s", what, "; ".join(pending.unanswered))
        if score.listed:
            log.info("dnsbl: %s listed by %s: score %d, threshold %d", what,
                     ", ".join(score.listed), score.total, self.settings.dnsbl_threshold)

    async def _greylist(self, screen: Screen, facts: ClientFacts, sender: str,
                        recipient: str) -> Reply | None:
        s = self.settings
        if in_networks(screen.address, s.greylist_networks):
            return None
        if s.greylist_domains.matches(sender.rpartition("@")[2]) or (
            facts.client_name != "unknown" and s.greylist_domains.matches(facts.client_name)
        ):
            return None
        assert self.greylist is not None
        try:
            decision = await self.greylist.check(facts.client_ip, sender, recipient, self._wall())
        except Exception:  # the database is ours: our trouble must not cost anybody mail
            log.exception("greylist: cannot check, letting the mail pass")
            return None
        label = maillog.client_label(facts.client_ip, facts.client_name)
        if decision.passed:
            if decision.first_pass:
                log.info("greylist: pass: %s from=<%s> to=<%s>: retried after the delay",
                         label, sender, recipient)
            return None
        wait = max(1, round(decision.wait))
        return r.greylisted(recipient, wait)

    def _limited(self, facts: ClientFacts, sender: str, verdict: LimitVerdict) -> Reply:
        user = facts.auth_user
        window = self.settings.sender_window
        figures = f"more than {verdict.limit} {verdict.what} in {window:g} s"
        if verdict.alert:
            label = maillog.client_label(facts.client_ip, facts.client_name)
            log.warning("sender rate limit exceeded: sasl_username=%s client=%s: %s; "
                        "refusing with 450 4.7.1", user, label, figures)
            if self.alert is not None:
                self.alert(
                    f"sender rate limit exceeded by {user}",
                    f"The authenticated user {user} sent {figures} (last from {label}),\n"
                    f"which [checks.sender_limits] does not allow. Further mail of this\n"
                    f"user is refused with 450 4.7.1 until the rate falls below the limit.\n\n"
                    f"If the account's password has been stolen, change it (mailhaven user\n"
                    f"passwd {user}) and look at the mail queue (mailhaven queue list).\n",
                )
        return r.sender_rate_limited(sender, str(user), figures)
