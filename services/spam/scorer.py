"""``score_message``: the base model, the tenant's layer, the phishing rules, the sender
lists and (where configured) spamd, combined into one calibrated score.

The score's log-odds are the sum of the indicators' weights: ``statistical_tokens`` (the
calibrated model plus the tenant's layer) and each rule that fired. A message with few
tokens (an empty one, a photo from a phone) gets little of the model's intercept and sits
near the training split's share of spam (see ``services.spam.model``). A block-listed sender
scores 1 and an allow-listed one 0, whatever the rest says (block wins).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from services.spam.features import base_features, sender_features
from services.spam.model import EVIDENCE_TOKENS, load_base_model
from services.spam.parse import ParsedMessage, parse_message
from services.spam.rules import evaluate_rules
from services.spam.verdict import Indicator, SenderLists, Verdict

if TYPE_CHECKING:
    from services.spam.layer import TenantLayer
    from services.spam.spamd import SpamdClient

DEFAULT_THRESHOLD = 0.6
TIME_BUDGET_SECONDS = 1.0
MAX_LOGIT = 30.0


def sigmoid(z: float) -> float:
    z = max(-MAX_LOGIT, min(MAX_LOGIT, z))
    return 1.0 / (1.0 + math.exp(-z))


def logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


@dataclass(frozen=True)
class Analysis:
    parsed: ParsedMessage
    features: frozenset[int]
    indicators: tuple[Indicator, ...]
    logit: float


def analyse(raw: bytes, *, layer: TenantLayer | None = None) -> Analysis:
    """Parse and score ``raw`` without lists or spamd: what ``TenantLayer.learn`` needs."""
    started = time.monotonic()
    parsed = parse_message(raw)
    base = base_features(parsed)
    model = load_base_model()
    statistical = model.calibrated_logit(base)
    features = frozenset(base | sender_features(parsed)) if layer is not None else frozenset(base)
    detail = "tokens of the subject, text and links"
    if len(base) < EVIDENCE_TOKENS:
        detail += f" (only {len(base)}: little evidence, near the prior)"
    if layer is not None and len(layer):
        tenant = layer.logit(features)
        if tenant:
            statistical += tenant
            detail += f" (this tenant's lessons {tenant:+.2f})"
    indicators = [Indicator("statistical_tokens", statistical, detail)]
    remaining = TIME_BUDGET_SECONDS - (time.monotonic() - started)
    indicators.extend(evaluate_rules(parsed, time_budget=max(remaining, 0.05)))
    total = sum(i.weight for i in indicators)
    return Analysis(parsed, features, tuple(indicators), total)


def _list_match(entries: frozenset[str], address: str) -> str | None:
    if not entries or "@" not in address:
        return None
    if address in entries:
        return address
    domain = address.rpartition("@")[2]
    labels = domain.split(".")
    for i in range(len(labels) - 1):
        candidate = ".".join(labels[i:])
        if candidate in entries:
            return candidate
    return None


def score_message(
    raw: bytes,
    *,
    layer: TenantLayer | None = None,
    lists: SenderLists | None = None,
    spamd: SpamdClient | None = None,
) -> Verdict:
    """Score one raw RFC 822 message (see the module doc). Never raises on the message's
    content: what could not be read is named in ``Verdict.limits``."""
    try:
        analysis = analyse(raw, layer=layer)
    except Exception as exc:  # noqa: BLE001 - a bug must not take a worker down with hostile mail
        return Verdict(score=0.5, indicators=(), limits=(f"scoring_error: {type(exc).__name__}",))
    indicators = list(analysis.indicators)
    total = analysis.logit
    limits = tuple(analysis.parsed.limits)
    if spamd is not None:
        result = spamd.check(raw)
        if result is not None:
            indicators.append(result.indicator())
            total += result.indicator().weight
    if lists is not None:
        _, sender = analysis.parsed.sender()
        blocked = _list_match(lists.block, sender)
        if blocked:
            return Verdict(1.0, (Indicator("sender_blocked", MAX_LOGIT, blocked), *indicators), limits)
        allowed = _list_match(lists.allow, sender)
        if allowed:
            return Verdict(0.0, (Indicator("sender_allowed", -MAX_LOGIT, allowed), *indicators), limits)
    return Verdict(sigmoid(total), tuple(indicators), limits)
