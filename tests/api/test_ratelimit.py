"""Per-tenant rate limits: counted in Redis across API processes, 429 in the error shape with
Retry-After, other tenants unaffected, probes never limited, and a dead Redis never fails a
request. Limits are per minute here: the sliding window only decays by one request every
few seconds, so nothing depends on how fast the test runs."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from mailroom.app import create_app
from mailroom.ratelimit import QUEUEING_ROUTES
from services.settings import load_settings
from tests.servers.ports import free_port
from tests.servers.redis import RedisServer
from tests.support import Api, TenantKit


@pytest.fixture(scope="module")
def counters() -> Iterator[RedisServer]:
    server = RedisServer(password=uuid.uuid4().hex).start()
    yield server
    server.stop()
    server.cleanup()


@pytest.fixture
def make_app(base_values: dict[str, Any], counters: RedisServer) -> Any:
    redis.Redis.from_url(counters.url).flushall()

    def make(**limits: Any) -> Any:
        values = {**base_values, "rate_limit_storage_url": counters.url, "rate_limit_per_second": 1000}
        return create_app(load_settings(**{**values, **limits}))

    return make


def assert_rate_limited(response: Any) -> None:
    assert response.status_code == 429, response.get_json()
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    error = response.get_json()["error"]
    assert error["code"] == "rate_limited"
    assert error["details"]["retry_after"] == retry_after
    assert set(error) == {"code", "message", "details"}


def test_one_tenant_over_its_limit_gets_429_another_does_not(
    make_app: Any, kit: TenantKit, other_kit: TenantKit
) -> None:
    first, second = make_app(rate_limit_per_minute=5), make_app(rate_limit_per_minute=5)
    mine_a, mine_b = Api(first, kit.admin_key), Api(second, kit.member_key)
    # Two API processes share the tenant's count: 3 + 2 requests use up the 5.
    for api in (mine_a, mine_a, mine_a, mine_b, mine_b):
        assert api.get("/api/accounts").status_code == 200
    assert_rate_limited(mine_a.get("/api/accounts"))
    assert_rate_limited(mine_b.get("/api/tasks"))
    # Another tenant, same moment, same processes: unaffected.
    theirs = Api(second, other_kit.admin_key)
    assert theirs.get("/api/accounts").status_code == 200
    # Probes are never limited.
    probe = first.test_client()
    for _ in range(8):
        assert probe.get("/healthz").status_code == 200
        assert probe.get("/metrics").status_code == 200


def test_requests_without_a_valid_key_count_by_address(make_app: Any, kit: TenantKit) -> None:
    app = make_app(rate_limit_per_minute=4)
    stranger = Api(app, "mr_" + "x" * 43)
    for _ in range(2):
        assert stranger.get("/api/accounts").status_code == 401
    assert Api(app, None).get("/api/accounts").status_code == 401
    assert app.test_client().get("/openapi.json").status_code == 200
    assert_rate_limited(stranger.get("/api/accounts"))
    # The tenant's own count is separate from the address's.
    assert Api(app, kit.admin_key).get("/api/accounts").status_code == 200


def test_routes_that_queue_work_have_a_lower_limit(make_app: Any, kit: TenantKit) -> None:
    app = make_app(rate_limit_per_minute=100, rate_limit_queue_per_minute=2)
    api = Api(app, kit.admin_key)
    missing = uuid.uuid4()
    for _ in range(2):
        assert api.post(f"/api/accounts/{missing}/verify").status_code == 404
    assert_rate_limited(api.post(f"/api/accounts/{missing}/sync"))
    assert api.get("/api/accounts").status_code == 200


def test_every_route_that_queues_a_task_has_the_queue_limit(app: Any) -> None:
    queueing = set()
    for path, operations in app.api_doc["paths"].items():
        for method, operation in operations.items():
            accepted = operation.get("responses", {}).get("202", {})
            if "TaskAccepted" in str(accepted):
                queueing.add((method.upper(), re.sub(r"\{(\w+)\}", r"<\1>", path)))
    assert queueing and queueing <= QUEUEING_ROUTES


def test_an_unreachable_counter_store_never_fails_a_request(
    base_values: dict[str, Any], kit: TenantKit, caplog: pytest.LogCaptureFixture
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(
        load_settings(**{**base_values, "rate_limit_storage_url": dead, "rate_limit_per_minute": 3})
    )
    api = Api(app, kit.admin_key)
    with caplog.at_level(logging.WARNING):
        assert api.get("/api/accounts").status_code == 200
    assert any("in-memory" in r.getMessage() for r in caplog.records), caplog.text
    # Counting goes on in the process meanwhile: the limit still holds.
    assert api.get("/api/accounts").status_code == 200
    assert api.get("/api/accounts").status_code == 200
    assert_rate_limited(api.get("/api/accounts"))
