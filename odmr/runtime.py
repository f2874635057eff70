"""What every session shares: settings, accounts, the spool, the TLS context, the
hosting policy built from them (`odmr.hosting`). The AUTH throttle (`odmr.throttle`)
and the metrics (`odmr.metrics.ServiceMetrics`) are the service's own, kept across
snapshots.

A reload builds a new Runtime snapshot and swaps `Service.runtime`; sessions
that already started keep the snapshot they began with.
"""
from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Optional

from odmr.accounts import Accounts
from odmr.config import Settings
from odmr.hosting import Hosting
from odmr.metrics import ServiceMetrics
from odmr.sasl import Decoys
from odmr.spool import Spool
from odmr.throttle import AuthThrottle


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
    # which recipients are taken, for which domain; quotas (from the fields above)
    hosting: Hosting = field(init=False, repr=False, compare=False)

    @property
    def hostname(self) -> str:
        return self.settings.hostname

    def __post_init__(self) -> None:
        # asked at every RCPT: computed once per snapshot
        hosted = self.accounts.hosted_domains() | frozenset(self.settings.domains)
        object.__setattr__(self, "hosting", Hosting(self.settings, hosted, self.spool))
        object.__setattr__(self, "_decoys", Decoys.like(
            self.decoy_key, (a.scram for a in self.accounts if a.scram is not None)))

    def hosted_domains(self) -> frozenset:
        return self.hosting.hosted

    def decoys(self) -> Decoys:
        """Stand-in SCRAM secrets for unknown names, shaped like the real ones."""
        return self._decoys
