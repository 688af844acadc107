"""An elector the election tests can wait on, over any lease backend (the job store's,
Kubernetes'), and the short timings they run with."""

from __future__ import annotations

import threading

from training.leases import ElectionTimings, Elector, LeaseBackend, Term

FAST = ElectionTimings(duration_s=1.0, renew_deadline_s=0.6, retry_period_s=0.1)
"""A lease of 1 s renewed every 0.1 s: a takeover within about a second of the holder's end."""


class Contender:
    """An elector whose elections and losses the test can wait for."""

    def __init__(self, leases: LeaseBackend, holder: str, timings: ElectionTimings) -> None:
        self.elected = threading.Event()
        self.lost = threading.Event()
        self.epochs: list[int] = []
        self.elector = Elector(
            leases,
            "reconciler",
            holder,
            on_elected=self._elected,
            on_lost=self.lost.set,
            timings=timings,
        )

    def _elected(self, term: Term) -> None:
        self.epochs.append(term.epoch)
        self.elected.set()
