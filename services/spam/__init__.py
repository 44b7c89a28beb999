"""Spam and phishing scoring: plain Python, no database, no Flask, no Celery.

The public interface, which the spam task and the API build on:

- ``score_message(raw, *, layer=None, lists=None, spamd=None) -> Verdict``: score one raw
  RFC 822 message within a time and size bound. Never raises on hostile input: what could
  not be read is named in ``Verdict.limits`` and the score is made from the rest.
- ``Verdict``: ``score`` (0..1, calibrated probability of spam), ``indicators`` (named,
  weighted reasons a person can read), ``limits`` (what was cut or skipped).
- ``DEFAULT_THRESHOLD``: the score from which a message is spam, unless the tenant sets
  its own.
- ``TenantLayer``: a tenant's own sparse adjustment over the shipped base model, learned
  incrementally from the tenant's spam/ham verdicts; serialisable to bytes for storage.
- ``SenderLists``: a tenant's allow- and block-list of senders and domains.
- ``SpamdClient``: an optional spamd, whose score joins as the ``spamassassin`` indicator.
"""

from __future__ import annotations

from services.spam.layer import LayerFormatError, TenantLayer
from services.spam.scorer import DEFAULT_THRESHOLD, score_message
from services.spam.spamd import SpamdClient
from services.spam.verdict import Indicator, SenderLists, Verdict

__all__ = [
    "DEFAULT_THRESHOLD",
    "Indicator",
    "LayerFormatError",
    "SenderLists",
    "SpamdClient",
    "TenantLayer",
    "Verdict",
    "score_message",
]
