"""How the services that start work (a send, the watcher's syncs) queue a task without
knowing Celery: they are handed a :class:`Queue`, which ``tasks.dispatch.dispatch`` with its
Celery app bound is (``functools.partial(dispatch, app)``). services/ imports nothing of the
layers above it (docs: ARCHITECTURE, layers)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from services.models import TaskRecord
from services.tenancy import Principal


class Queued(Protocol):
    @property
    def record(self) -> TaskRecord: ...

    #: False when an equivalent task was already in flight and its record is returned.
    @property
    def created(self) -> bool: ...


class Queue(Protocol):
    """Record one task and publish it (tasks.dispatch.dispatch's contract)."""

    def __call__(
        self,
        sessions: Session | sessionmaker[Any],
        *,
        type: str,
        tenant_id: str,
        user_id: str | None,
        account_id: str | None,
        params: dict[str, Any],
        origin: str = ...,
        visible_to: Principal | None = ...,
        eta: datetime | None = ...,
        task_id: str | None = ...,
    ) -> Queued: ...
