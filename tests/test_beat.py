"""Exactly one Beat, for real: two ``celery beat`` processes on one private broker, the
broker restarted empty under a running Beat, and Beat's heartbeat in the admin health."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mailroom.app import create_app
from services.settings import load_settings
from tasks.celery_app import make_celery
from tasks.monitoring import get_queue_details
from tests.conftest import env_for, worker_env
from tests.servers.redis import RedisServer
from tests.servers.workers import CeleryBeat
from tests.support import Api

pytestmark = pytest.mark.slow


@pytest.fixture
def beat_stack(base_values: dict[str, Any]) -> Iterator[tuple[RedisServer, dict[str, Any], dict[str, str]]]:
    broker = RedisServer()
    broker.start()
    values = {**base_values, "broker_url": broker.url, "periodic_sync_seconds": "1"}
    try:
        yield broker, values, worker_env(env_for(values))
    finally:
        broker.stop()


def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _periodic_waiting(values: dict[str, Any]) -> int:
    return get_queue_details(make_celery(load_settings(**values)))["periodic"].depth


def test_a_second_beat_waits_and_takes_over_when_the_first_stops(beat_stack) -> None:
    _, values, env = beat_stack
    first, second = CeleryBeat(env=env), CeleryBeat(env=env)
    first.start()
    try:
        first.wait_for_log(r"beat: Acquired lock", timeout=30)
        second.start()
        _wait(lambda: _periodic_waiting(values) >= 3, 30, "the first Beat to queue periodic syncs")
        time.sleep(3)
        assert "Acquired lock" not in second.log_text()
        assert "Sending due task" not in second.log_text()  # it waits, it queues nothing
        first.stop()  # a graceful stop releases the lock
        second.wait_for_log(r"beat: Acquired lock", timeout=40)
        before = _periodic_waiting(values)
        _wait(lambda: _periodic_waiting(values) > before, 30, "the second Beat to queue work")
    finally:
        first.stop()
        second.stop()


def test_beat_survives_its_broker_restarting_empty_and_health_shows_its_ticks(beat_stack, kit) -> None:
    broker, values, env = beat_stack
    api = Api(create_app(load_settings(**values)), kit.admin_key)
    beat = CeleryBeat(env=env)
    beat.start()
    try:
        beat.wait_for_log(r"beat: Acquired lock", timeout=30)
        _wait(lambda: api.get("/api/admin/health").get_json()["beat"]["ok"], 30, "a Beat heartbeat")
        report = api.get("/api/admin/health").get_json()["beat"]
        assert report["last_tick_at"] and 0 <= report["seconds_ago"] < 45
        assert report["last_tick_at"].endswith("Z"), report  # the one form of every API time
        broker.restart()  # the test Redis keeps nothing: lock, schedule and queue are gone
        assert _periodic_waiting(values) == 0
        beat.wait_for_log(r"lock taken again; schedule restored", timeout=60)
        _wait(lambda: _periodic_waiting(values) >= 2, 30, "periodic work queued after the restart")
        assert beat.is_running()
    finally:
        beat.stop()
    # With no Beat, health says so once the heartbeat is old; here: the key expires with
    # the restart's empty Redis, so a fresh broker shows no Beat at all.
    broker.restart()
    report = api.get("/api/admin/health").get_json()
    assert report["beat"] == {"ok": False, "last_tick_at": None, "seconds_ago": None}
    assert report["status"] == "degraded"
