"""``Batch.health()``: whether a batch is live and ready, and why, from what its run knows.

A :class:`Health` is a list of named checks, each ``ok`` or not with a one-line ``detail``
saying what was found. Two verdicts come from them:

- **live** (``/healthz``): a ``run()``/``watch()`` is under way and its heartbeat renewed its
  lock and leases recently. Not live means restarting the process is the fix: the run ended
  (failed, lost its lock, or was stopped), or its event loop or ledger is stuck so long that its
  leases are about to go to other runners.
- **ready** (``/readyz``): live, and the run is doing its work: it holds its job lock (or, shared,
  its runner record), its ledger answers, its source directory is there, its first scan is
  done (and, watching, its polls go on), and it is not stopping.

Nothing is probed: every check reads what the run observed (the heartbeat is the ledger's
probe, every quarter lease), so ``health()`` is cheap, synchronous and never waits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["LIVE_CHECKS", "Health", "HealthCheck", "not_running"]

#: The checks that decide liveness; readiness needs every check.
LIVE_CHECKS = frozenset({"running", "heartbeat"})


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """One reason of a :class:`Health`: its ``name``, whether it is ``ok``, and a one-line
    ``detail`` saying what was found.

    The names: ``running`` (a run is under way), ``heartbeat`` (the lock and leases were
    renewed recently), ``lock`` (the job lock, or for a shared job the runner record, is held),
    ``ledger`` (the ledger answers), ``scan`` (the first scan is done; watching, the polls go
    on), ``stopping`` (no stop was requested). See ``asyncbatch help operations``.
    """

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Health:
    """Whether a batch is live and ready (``Batch.health()``), with the checks that say why.

    ``live`` is true when the ``running`` and ``heartbeat`` checks are ok; ``ready`` when every
    check is. ``checks`` keep a fixed order. What each says is what the run observed at the
    moment ``health()`` was called.
    """

    live: bool
    ready: bool
    checks: tuple[HealthCheck, ...]

    @classmethod
    def of(cls, checks: tuple[HealthCheck, ...]) -> Health:
        """The verdicts of ``checks``."""
        live = all(c.ok for c in checks if c.name in LIVE_CHECKS)
        return cls(live=live, ready=live and all(c.ok for c in checks), checks=checks)

    def check(self, name: str) -> HealthCheck:
        """The check called ``name``; raises ``KeyError`` if there is none."""
        for found in self.checks:
            if found.name == name:
                return found
        raise KeyError(name)

    @property
    def problems(self) -> list[str]:
        """``name: detail`` of each check that is not ok."""
        return [f"{c.name}: {c.detail}" for c in self.checks if not c.ok]

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready form: ``{"live": .., "ready": .., "checks": {name: {"ok", "detail"}}}``
        (what the ``/healthz`` and ``/readyz`` endpoints answer)."""
        return {
            "live": self.live,
            "ready": self.ready,
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in self.checks},
        }


def not_running(detail: str) -> Health:
    """The health of a batch with no run under way: neither live nor ready."""
    return Health.of((HealthCheck("running", False, detail),))
