"""Engines and sessions. One transaction per request and per task attempt, committed at the
edge by :func:`transaction`; helpers in ``services`` flush but never commit.

Tenant scoping is a property of the session, not of each query. Every session made here is
in one of three modes, kept in ``session.info``:

* **bound to a tenant** (:func:`tenant_sessions`, :func:`bind_tenant`): every ORM SELECT,
  relationship or attribute load, and ORM-enabled bulk ``update()``/``delete()`` gets
  ``WHERE <model>.tenant_id = :tenant`` (``tenants.id`` for :class:`Tenant`) through
  ``with_loader_criteria``, and ``session.get()`` never hands out another tenant's row even
  when it is already in the identity map. The API binds the request's session right after
  authentication; a worker binds each task attempt to its task's tenant.
* **unrestricted** (:func:`unrestricted_unsafe_sessions`, or one statement through
  ``execution_options(unrestricted_unsafe=True)``): reads across tenants, for Beat, cleanup,
  metrics, operators' commands and the API-key lookup. Grep ``unrestricted_unsafe`` to find
  every such place.
* **unbound** (a plain :func:`make_sessionmaker` session): any ORM statement on a tenant
  model raises :class:`UnscopedQuery`. Forgetting to choose is a loud error, never a silent
  read of every tenant. Inserts and plain SQL (``text()``, Core statements on tables) are
  not ORM entity reads and pass in every mode.

The hottest statements of a task's life (claiming, ending, a send's row updates) are
:class:`ScopedStatement`: Core statements built once, at import, that take the tenant
condition from the session's mode themselves (an ORM statement costs about a millisecond
of Python each time it is built, keyed and compiled; these cost a dictionary of
parameters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Executable, create_engine, event, exc, text
from sqlalchemy.orm import ORMExecuteState, Session, sessionmaker, with_loader_criteria

from services.models import Base, Tenant, TenantOwned
from services.settings import Settings

#: ``session.info`` key holding the tenant a session is bound to.
TENANT_KEY = "tenant_id"
#: ``session.info`` key (or statement execution option) of the cross-tenant escape.
UNRESTRICTED_KEY = "unrestricted_unsafe"


class UnscopedQuery(RuntimeError):
    """An ORM read of tenant data on a session that is neither bound to a tenant nor
    explicitly unrestricted: a programming error, never a client's fault."""


class MailroomSession(Session):
    """A session whose ``get()`` respects the tenant it is bound to, identity map included."""

    def get(self, entity: Any, ident: Any, *args: Any, **kwargs: Any) -> Any:
        row = super().get(entity, ident, *args, **kwargs)
        # An identity-map hit emits no SQL, so the loader criteria never see it: a row
        # loaded earlier through an escape (or before binding) must not leak through get().
        if row is not None and not visible(self, row):
            return None
        return row


def make_engine(settings: Settings) -> Engine:
    """An engine for ``settings.database_url``; SQLite gets WAL, foreign keys and a busy wait."""
    url = settings.database_url
    if settings.is_sqlite:
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()
            # SQLite's own lower() changes only A to Z: a case-insensitive search (icontains:
            # lower(x) LIKE lower(y)) would miss "ÜBER" for "über". Python's folds every letter.
            dbapi_connection.create_function("lower", 1, _lower, deterministic=True)

        return engine
    # Behind PgBouncer in transaction mode, consecutive transactions of one client
    # connection may run on different server connections: psycopg must not prepare
    # statements (it does after five runs of one query), or the next transaction asks a
    # server that never saw them. Everything else Mailroom does is transaction-scoped
    # (row locks, no SET, no advisory or session locks, no LISTEN).
    connect_args: dict[str, Any] = {"prepare_threshold": None} if settings.database_pgbouncer else {}
    engine = create_engine(
        url,
        pool_size=settings.database_pool_size,
        max_overflow=settings.database_pool_size,
        pool_recycle=1800,
        connect_args=connect_args,
    )
    _ping_idle_connections(engine)
    return engine


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


#: Collations whose case mapping covers every letter, in order of preference: ICU's root
#: collation, then glibc's C.UTF-8 (a cluster made with --locale=C folds only A to Z).
_UNICODE_COLLATIONS = ("und-x-icu", "C.utf8", "C.UTF-8")
_unicode_collation: dict[str, str | None] = {}


def unicode_collation(session: Session) -> str | None:
    """On PostgreSQL, a collation under which ILIKE folds the case of every letter whatever
    the database's own locale (read once per database), or None where there is none (then
    the database's default applies); None on other databases."""
    bind = session.get_bind()
    if bind.dialect.name != "postgresql":
        return None
    key = str(bind.engine.url)
    if key not in _unicode_collation:
        names = set(
            session.scalars(
                text("SELECT collname FROM pg_collation WHERE collname = ANY(:names)"),
                {"names": list(_UNICODE_COLLATIONS)},
            )
        )
        _unicode_collation[key] = next((n for n in _UNICODE_COLLATIONS if n in names), None)
    return _unicode_collation[key]


#: A pooled connection idle longer than this is pinged before it is handed out again.
PING_AFTER_IDLE = 2.0
_LAST_USED = "mailroom_last_used"


def _ping_idle_connections(engine: Engine) -> None:
    """``pool_pre_ping``, but only for connections that sat idle in the pool for more than
    :data:`PING_AFTER_IDLE` seconds. A connection checked out again within that time (every
    one, under load: a send costs several short transactions) goes straight to its first
    statement instead of paying a ``SELECT 1`` round trip first (that ping was about a
    tenth of a send worker's and of the API's time). What a server restart, a failover or
    an idle timeout closes is what sat idle; a connection that dies within the last
    seconds of use fails its next statement, SQLAlchemy then discards every connection of
    the pool opened before, and the next checkout connects afresh."""

    @event.listens_for(engine, "connect")
    def _fresh(_dbapi: Any, record: Any) -> None:
        record.info[_LAST_USED] = time.monotonic()

    @event.listens_for(engine, "checkin")
    def _used(_dbapi: Any, record: Any) -> None:
        if record is not None:
            record.info[_LAST_USED] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi: Any, record: Any, _proxy: Any) -> None:
        if time.monotonic() - record.info.get(_LAST_USED, 0.0) <= PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi)
        except Exception as error:
            # The pool discards this connection and hands out another (SQLAlchemy's
            # documented pessimistic disconnect handling).
            raise exc.DisconnectionError() from error


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """Unbound sessions: bind them (:func:`bind_tenant`) or derive a factory from this one
    (:func:`tenant_sessions`, :func:`unrestricted_unsafe_sessions`) before reading tenant data."""
    # Typed as plain Session factories: callers need nothing MailroomSession adds.
    return sessionmaker(bind=engine, class_=MailroomSession, expire_on_commit=False)  # type: ignore[return-value]


class _DerivedSessionmaker(sessionmaker[Any]):
    """``parent``'s factory with extra ``session.info``. It reuses the parent's session class
    (``sessionmaker()`` would make a new class each time, and one is derived per request
    and per task attempt)."""

    def __init__(self, parent: sessionmaker[Any], info: dict[str, Any]) -> None:
        base_info = {
            k: v for k, v in parent.kw.get("info", {}).items() if k not in (TENANT_KEY, UNRESTRICTED_KEY)
        }
        self.kw = {**parent.kw, "info": {**base_info, **info}}
        self.class_ = parent.class_


def _derive(factory: sessionmaker[Any], info: dict[str, Any]) -> sessionmaker[Any]:
    return _DerivedSessionmaker(factory, info)


def tenant_sessions(factory: sessionmaker[Any], tenant_id: str) -> sessionmaker[Any]:
    """A factory like ``factory`` whose sessions see only ``tenant_id``'s rows."""
    if not tenant_id:
        raise ValueError("a tenant-bound session needs a tenant id")
    return _derive(factory, {TENANT_KEY: tenant_id})


def unrestricted_unsafe_sessions(factory: sessionmaker[Any]) -> sessionmaker[Any]:
    """A factory like ``factory`` whose sessions read across all tenants. Only Beat, cleanup,
    metrics, operators' commands and tests may use this."""
    return _derive(factory, {UNRESTRICTED_KEY: True})


def bind_tenant(session: Session, tenant_id: str) -> None:
    """Bind an unbound session to ``tenant_id`` from now on (the API does this right after
    the key lookup). Rebinding to another tenant is refused: one session, one tenant."""
    current = session.info.get(TENANT_KEY)
    if current is not None and current != tenant_id:
        raise UnscopedQuery("this session is bound to another tenant already")
    session.info.pop(UNRESTRICTED_KEY, None)
    session.info[TENANT_KEY] = tenant_id


def bound_tenant(session: Session) -> str | None:
    return session.info.get(TENANT_KEY)


@cache
def _tenant_models() -> tuple[type[Any], ...]:
    return tuple(
        m.class_
        for m in Base.registry.mappers
        if m.class_ is Tenant or "tenant_id" in m.columns  # type: ignore[operator]
    )


def _owner(row: Any) -> str | None:
    if isinstance(row, Tenant):
        return row.id
    return getattr(row, "tenant_id", None) if isinstance(row, _tenant_models()) else None


def visible(session: Session, row: Any) -> bool:
    """Whether ``row`` may be handed out by ``session`` (any row in an unbound or
    unrestricted session; in a bound one, only rows of its tenant)."""
    tenant_id = session.info.get(TENANT_KEY)
    if tenant_id is None or not isinstance(row, _tenant_models()):
        return True
    return _owner(row) == tenant_id


@lru_cache(maxsize=4096)
def _criteria(tenant_id: str) -> tuple[Any, ...]:
    # Built once per tenant (per process). Two options, not one per model: every option is
    # part of each statement's cache key and is walked on every execution, and fourteen of
    # them cost more than a small query itself (one on TenantOwned covers every model that
    # has a tenant_id; _check_owned_models makes sure each such model says so).
    _check_owned_models()
    return (
        with_loader_criteria(Tenant, lambda cls: cls.id == tenant_id, include_aliases=True),
        with_loader_criteria(TenantOwned, lambda cls: cls.tenant_id == tenant_id, include_aliases=True),
    )


@cache
def _check_owned_models() -> None:
    missing = [m.__name__ for m in _tenant_models() if m is not Tenant and not issubclass(m, TenantOwned)]
    if missing:
        raise TypeError(f"models with a tenant_id must derive from TenantOwned: {', '.join(sorted(missing))}")


@event.listens_for(MailroomSession, "do_orm_execute")
def _scope_statement(state: ORMExecuteState) -> None:
    if state.is_insert or state.execution_options.get(UNRESTRICTED_KEY):
        return
    if not state.is_orm_statement:
        return  # a Core statement: loader criteria do not apply (ScopedStatement scopes itself)
    info = state.session.info
    if info.get(UNRESTRICTED_KEY):
        return
    tenant_id = info.get(TENANT_KEY)
    if tenant_id is None:
        touched = [m.class_.__name__ for m in state.all_mappers if issubclass(m.class_, _tenant_models())]
        if touched:
            raise UnscopedQuery(
                f"ORM statement on {', '.join(sorted(set(touched)))} in a session bound to no tenant; "
                "use tenant_sessions()/bind_tenant(), or unrestricted_unsafe_sessions() where "
                "reading across tenants is intended"
            )
        return
    if (state.is_update or state.is_delete) and state.is_executemany:
        # ORM bulk UPDATE by primary key (a list of parameter sets) ignores loader criteria,
        # so the tenant condition goes into its WHERE clause itself. SQLAlchemy cannot then
        # synchronize objects already in the session; callers of bulk updates (the sync)
        # work on column tuples, not loaded objects.
        state.update_execution_options(synchronize_session=None)
        for mapper in state.all_mappers:
            model = mapper.class_
            if issubclass(model, _tenant_models()):
                column = model.id if model is Tenant else model.tenant_id
                state.statement = state.statement.where(column == tenant_id)  # type: ignore[attr-defined]
        return
    state.statement = state.statement.options(*_criteria(tenant_id))


#: The parameter a ScopedStatement's tenant condition binds (an UPDATE may not bind a
#: parameter named like a column).
SCOPE_PARAM = "scope_tenant_id"


class ScopedStatement:
    """A Core statement built once, in two forms: ``build(True)`` must add
    ``<table>.tenant_id = :scope_tenant_id`` (:data:`SCOPE_PARAM`; the session bound to a
    tenant supplies it), ``build(False)`` must not (for an unrestricted session). An unbound session
    raises :class:`UnscopedQuery`, as an ORM statement would."""

    def __init__(self, build: Callable[[bool], Executable]) -> None:
        self.scoped = build(True)
        self.unscoped = build(False)

    def execute(self, session: Session, params: dict[str, Any] | None = None) -> Any:
        info = session.info
        tenant_id = info.get(TENANT_KEY)
        if tenant_id is not None:
            return session.execute(self.scoped, {**(params or {}), SCOPE_PARAM: tenant_id})
        if info.get(UNRESTRICTED_KEY):
            return session.execute(self.unscoped, params or {})
        raise UnscopedQuery("a tenant statement in a session bound to no tenant")


@contextmanager
def transaction(factory: sessionmaker[Any]) -> Iterator[Session]:
    """A session whose work is committed on success and rolled back on any error."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
