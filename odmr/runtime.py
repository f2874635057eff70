"""What every session shares: settings, accounts, the spool, and the hosting policy
(which recipients are taken, for which domain; quotas). The AUTH throttle
(`odmr.throttle`) and the metrics (`odmr.metrics.ServiceMetrics`) are the
service's own, kept across snapshots.

A reload builds a new Runtime snapshot and swaps `Service.runtime`; sessions
that already started keep the snapshot they began with.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from odmr import replies
from odmr.accounts import Accounts
from odmr.config import Settings
from odmr.metrics import ServiceMetrics
from odmr.names import address_is_safe, normalize_domain, split_address
from odmr.sasl import Decoys
from odmr.spool import OUTBOUND, Spool
from odmr.syntax import route_in_address
from odmr.throttle import AuthThrottle

# (domain or None, SMTP code, enhanced text)
Verdict = Tuple[Optional[str], int, str]


@dataclass(frozen=True)
class Runtime:
    settings: Settings
    accounts: Accounts
    spool: Spool
    tls: Optional[ssl.SSLContext] = None
    throttle: AuthThrottle = field(default_factory=AuthThrottle)
    # from beside the users file (accounts.decoy_secret); empty: this process only
    decoy_key: bytes = field(default=b"", repr=False)
    # the service's own, like the throttle: kept across snapshots, never shared by two services
    metrics: ServiceMetrics = field(default_factory=ServiceMetrics, repr=False)

    @property
    def hostname(self) -> str:
        return self.settings.hostname

    def __post_init__(self) -> None:
        # asked at every RCPT: computed once per snapshot
        object.__setattr__(self, "_hosted",
                           self.accounts.hosted_domains() | frozenset(self.settings.domains))
        object.__setattr__(self, "_decoys", Decoys.like(
            self.decoy_key, (a.scram for a in self.accounts if a.scram is not None)))

    def hosted_domains(self) -> frozenset:
        return self._hosted

    def decoys(self) -> Decoys:
        """Stand-in SCRAM secrets for unknown names, shaped like the real ones."""
        return self._decoys

    def classify_recipient(self, address: str, utf8_allowed: bool, configured: bool = False,
                           route: str = "") -> Verdict:
        """Decide whether a recipient address is accepted for spooling, and for which domain.

        `configured`: an address from the configuration ([smtp] postmaster), which a
        domain's recipient list does not restrict. `route`: the source route the
        client put before the address (`@a,@b` of <@a,@b:u@d>)."""
        if not address:
            return (None,) + replies.NULL_RECIPIENT
        # controls and brackets first (they could break the spool's envelope lines); a
        # backslash is judged as routing first, since an escape can hide an '@' in quotes
        if not address_is_safe(address.replace("\\", "")):
            return (None,) + replies.BAD_RECIPIENT
        routed = self.routing(address, route)
        if routed:
            return None, replies.ROUTING_REFUSED[0], replies.ROUTING_REFUSED[1] % routed
        if "\\" in address:
            return (None,) + replies.BAD_RECIPIENT
        if not address.isascii() and not utf8_allowed:
            return (None,) + replies.NON_ASCII_ADDRESS
        try:
            local, domain_text = split_address(address)
        except ValueError:
            return (None,) + replies.BAD_RECIPIENT
        if len(local) > 64 * 4 or domain_text.startswith("["):
            return (None,) + replies.RELAYING_DENIED
        try:
            domain = normalize_domain(domain_text)
        except ValueError:
            return (None,) + replies.BAD_RECIPIENT
        if domain not in self.hosted_domains():
            return (None,) + replies.RELAYING_DENIED
        if not configured and local.lower() != "postmaster" \
                and not self.settings.policy(domain).accepts(local, domain):
            # postmaster@ every domain we take mail for is always accepted (RFC 5321 §4.5.1)
            return (None,) + replies.NO_SUCH_USER
        return (domain,) + replies.RCPT_OK

    def routing(self, address: str, route: str = "") -> Optional[str]:
        """Why the address would be routed onward by the customer's MTA, when
        [smtp] allow_routing_local_parts does not allow that; else None."""
        if self.settings.smtp.allow_routing_local_parts:
            return None
        if route:
            return "a source route"
        return route_in_address(address)

    def sender_routing(self, sender: str) -> Optional[str]:
        """Why a sender in a hosted domain would be routed onward: its DSNs are
        spooled for the customer, whose MTA would follow the route (backscatter relay)."""
        try:
            domain = normalize_domain(split_address(sender)[1])
        except ValueError:
            return None
        return self.routing(sender) if domain in self.hosted_domains() else None

    def postmaster_address(self) -> str:
        """Where the domainless <postmaster> goes: [smtp] postmaster, else postmaster@hostname."""
        return self.settings.smtp.postmaster or "postmaster@" + self.hostname

    def postmaster_recipient(self, utf8_allowed: bool, route: str = "") -> Tuple[str, Verdict]:
        """The domainless <postmaster> (RFC 5321 §4.5.1: it must work): the configured
        mailbox when it is in a hosted domain; otherwise kept in the OUTBOUND queue,
        addressed to that mailbox, for `[queue] bounce_relay` to hand on. A route still
        refuses it."""
        target = self.postmaster_address()
        verdict = self.classify_recipient(target, utf8_allowed, configured=True, route=route)
        if verdict[0] is None and verdict[1:] in (replies.RELAYING_DENIED, replies.NO_SUCH_USER) \
                and not route:
            verdict = (OUTBOUND,) + replies.RCPT_OK
        return target, verdict

    def quota_domains(self, domains) -> List[str]:
        """Those of `domains` with a quota (their commits are checked under a lock)."""
        return [d for d in domains if self.settings.policy(d).max_bytes
                or self.settings.policy(d).max_messages]

    def quota_ok(self, domain: str, incoming_size: int = 0, fresh: bool = False) -> bool:
        policy = self.settings.policy(domain)
        if not policy.max_bytes and not policy.max_messages:
            return True
        def room(count: int, size: int) -> bool:
            return not ((policy.max_messages and count >= policy.max_messages)
                        or (policy.max_bytes and size + incoming_size > policy.max_bytes))
        # a refusal is never made on a cached count: the domain may have just been emptied
        return (not fresh and room(*self.spool.usage(domain))) \
            or room(*self.spool.usage(domain, fresh=True))

