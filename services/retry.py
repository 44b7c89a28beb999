"""Retry timing shared by task attempts (tasks.lifecycle) and webhook deliveries
(services.webhooks)."""

from __future__ import annotations

import random


def backoff_delay(retries: int, *, base: float, cap: float, rng: random.Random | None = None) -> float:
    """Seconds before retry number ``retries + 1``: base doubling (5, 10, 20 …), capped, with
    ±20 % jitter so a burst of failures does not come back as a burst."""
    delay = min(cap, base * (2**retries))
    jitter = (rng or random).uniform(0.8, 1.2)
    return round(min(cap, delay * jitter), 3)
