"""Planner statistics for the message list.

A first sync can take a folder from nothing to 100,000 rows in minutes. Until the table is
analysed the planner still believes it is tiny (PostgreSQL's autovacuum gets to it later,
SQLite never does) and may choose a scan and a sort over the ordered index. Sync calls
:func:`analyze_after_first_walk` when a folder's first walk completes.
"""

from __future__ import annotations

import logging

from sqlalchemy import text
from sqlalchemy.orm import Session

log = logging.getLogger("mailroom.reads")

#: Below this many messages in the folder the old statistics cannot mislead much, and an
#: ANALYZE (a 30,000-row sample on PostgreSQL, a full index pass on SQLite) costs more than
#: it is worth.
ANALYZE_MIN_ROWS = 1000


def analyze_after_first_walk(session: Session, folder_id: str) -> bool:
    """Refresh the statistics of the ``messages`` table when the folder whose first walk
    just completed holds at least :data:`ANALYZE_MIN_ROWS` messages (read from its stored
    count, so call it after the counts are refreshed). Runs in ``session``'s transaction;
    both PostgreSQL and SQLite allow ANALYZE there. Returns whether it ran."""
    # Plain SQL: sync's session is not bound to a tenant, and this reads one counter.
    count = session.scalar(text("SELECT message_count FROM folders WHERE id = :id"), {"id": folder_id}) or 0
    if count < ANALYZE_MIN_ROWS:
        return False
    session.execute(text("ANALYZE messages"))
    log.info("analysed messages after a first sync of %d messages", count)
    return True
