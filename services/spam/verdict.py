"""The result types of spam scoring (see ``services.spam``)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Indicator:
    """One reason behind a score: a stable snake_case ``name``, the ``weight`` it added to
    the score's log-odds (negative for reasons pointing to ham) and a short ``detail`` a
    person can read (e.g. the mismatched link), never longer than 200 characters."""

    name: str
    weight: float
    detail: str = ""

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "weight": round(self.weight, 3), "detail": self.detail}


@dataclass(frozen=True)
class Verdict:
    """``score`` is the calibrated probability that the message is spam (0..1)."""

    score: float
    indicators: tuple[Indicator, ...] = ()
    limits: tuple[str, ...] = ()

    def is_spam(self, threshold: float) -> bool:
        return self.score >= threshold


@dataclass(frozen=True)
class SenderLists:
    """A tenant's allow- and block-list. Entries are lower-case addresses
    (``a@example.com``) or domains (``example.com``; a domain also covers its
    subdomains). A block entry wins over an allow entry for the same sender."""

    allow: frozenset[str] = field(default_factory=frozenset)
    block: frozenset[str] = field(default_factory=frozenset)
