"""Spam and phishing scoring: plain Python, no database, no Flask, no Celery.

The public interface, which the spam task and the API build on:

- ``score_message(raw, *, layer=None, lists=None) -> Verdict``: score one raw RFC 822
  message within a time and size bound. Never raises on hostile input: what could not be
  read is named in ``Verdict.limits`` and the score is made from the rest.
- ``Verdict``: ``score`` (0..1, calibrated probability of spam), ``indicators`` (named,
  weighted reasons a person can read), ``limits`` (what was cut or skipped).
- ``TenantLayer``: a tenant's own sparse adjustment over the shipped base model, learned
  incrementally from the tenant's spam/ham verdicts; serialisable to bytes for storage.
- ``SenderLists``: a tenant's allow- and block-list of senders and domains.
"""

from __future__ import annotations

from services.spam.verdict import Indicator, SenderLists, Verdict  # noqa: F401
