"""/readyz checks the database, the broker and the result backend, and says only which check
failed; /api/admin/health keeps the error messages, without passwords."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from mailroom.app import create_app
from mailroom.health import redact
from services.settings import load_settings
from tests.servers.redis import RedisServer
from tests.support import Api, TenantKit


@pytest.fixture(scope="module")
def stopped_results() -> Iterator[RedisServer]:
    """A result-backend Redis that was running and has been stopped (its port is closed)."""
    server = RedisServer(password="results-" + uuid.uuid4().hex).start()
    server.stop()
    yield server
    server.cleanup()


def test_readyz_when_everything_answers(app: Any) -> None:
    response = app.test_client().get("/readyz")
    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ready",
        "checks": {"database": {"ok": True}, "broker": {"ok": True}, "result_backend": {"ok": True}},
    }


def test_readyz_names_a_stopped_result_backend_and_nothing_else(
    base_values: dict[str, Any], stopped_results: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(load_settings(**{**base_values, "result_backend_url": stopped_results.url}))
    with caplog.at_level(logging.WARNING, logger="mailroom.health"):
        response = app.test_client().get("/readyz")
    assert response.status_code == 503
    assert response.get_json() == {
        "status": "unavailable",
        "checks": {"database": {"ok": True}, "broker": {"ok": True}, "result_backend": {"ok": False}},
    }
    body = response.get_data(as_text=True)
    for secret in (str(stopped_results.port), stopped_results.host, str(stopped_results.password)):
        assert secret not in body
    # The operator finds the reason in the log.
    assert str(stopped_results.port) in caplog.text


def test_admin_health_keeps_the_message_without_passwords(
    base_values: dict[str, Any], stopped_results: RedisServer, kit: TenantKit
) -> None:
    app = create_app(load_settings(**{**base_values, "result_backend_url": stopped_results.url}))
    report = Api(app, kit.admin_key).get("/api/admin/health").get_json()
    assert report["status"] == "degraded"
    assert report["database"]["ok"] and report["broker"]["ok"]
    assert report["result_backend"]["ok"] is False and report["result_backend"]["error"]
    assert str(stopped_results.password) not in str(report)


def test_redact_blanks_url_credentials_and_configured_passwords(base_values: dict[str, Any]) -> None:
    settings = load_settings(**{**base_values, "broker_password": "hunter2-broker"})
    message = redact(
        "cannot reach redis://:s3cret@db.internal:6379/0 (auth hunter2-broker) "
        "postgresql+psycopg://mailroom:pgpass@pg:5432/mailroom",
        settings,
    )
    assert "s3cret" not in message and "hunter2-broker" not in message and "pgpass" not in message
    assert "db.internal:6379" in message
