"""Per-app and per-request state: the settings, the Celery app, the request's session.

One database transaction per request: opened on first use, committed at the end of a
successful request and rolled back otherwise. The request's session starts unbound (it
refuses tenant reads) and is bound to the caller's tenant right after the key lookup."""

from __future__ import annotations

from dataclasses import dataclass

from celery import Celery
from flask import Flask, Response, current_app, g
from sqlalchemy.orm import Session, sessionmaker

from services.crypto import SecretBox
from services.settings import Settings


@dataclass
class AppState:
    settings: Settings
    sessions: sessionmaker[Session]
    celery: Celery
    box: SecretBox


def state() -> AppState:
    return current_app.extensions["mailroom"]  # type: ignore[no-any-return]


def db_session() -> Session:
    if "db" not in g:
        g.db = state().sessions()
    return g.db  # type: ignore[no-any-return]


def install_request_session(app: Flask) -> None:
    @app.after_request
    def _commit(response: Response) -> Response:
        # Committed before the response leaves, so a failed commit is a 500, not a lie.
        session: Session | None = g.get("db")
        if session is not None:
            if response.status_code < 400:
                session.commit()
            else:
                session.rollback()
        return response

    @app.teardown_request
    def _close(exc: BaseException | None) -> None:
        session: Session | None = g.pop("db", None)
        if session is not None:
            session.rollback()
            session.close()


def commit() -> None:
    """Commit the request's work now (before publishing a task that refers to it)."""
    if "db" in g:
        g.db.commit()
