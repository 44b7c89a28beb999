"""The worker host's consumer loop (tasks/embedded.py) against a real Redis broker: while the
worker may take no more messages it does not ask the broker (where kombu would sleep up to a
second), and it asks as soon as a message is acknowledged."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from tasks.embedded import _prompt_synloop, _PromptConnection, _PromptConsumer
from tests.conftest import env_for, worker_env
from tests.servers.redis import RedisServer
from tests.servers.workers import WorkerHostProcess


@pytest.fixture
def consumer(broker: RedisServer) -> Iterator[tuple[Any, list[Any], Producer]]:
    """A connection with a prefetch of one, consuming a fresh queue, and a producer of it."""
    name = "loop-" + uuid.uuid4().hex[:8]
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
    with Connection(broker.url) as connection:
        channel = connection.channel()
        channel.basic_qos(0, 1, False)
        received: list[Any] = []
        with Consumer(channel, [queue], callbacks=[lambda _body, message: received.append(message)]):
            producer = Producer(connection.channel(), exchange=queue.exchange, routing_key=name)
            producer.declare()
            queue(connection.channel()).declare()
            yield _PromptConnection(connection, channel), received, producer


def test_a_full_prefetch_waits_without_taking_and_an_ack_lets_the_next_in(consumer) -> None:
    prompt, received, producer = consumer
    for n in range(2):
        producer.publish({"n": n})
    prompt.drain_events(timeout=5)
    assert [m.payload for m in received] == [{"n": 0}]
    # The prefetch (one) is taken: the wait ends in a timeout with the second still queued.
    with pytest.raises(TimeoutError):
        prompt.drain_events(timeout=0.2)
    assert len(received) == 1
    # An ack from another thread (a pool thread's) frees the slot during the wait, and the
    # message comes within that wait: kombu's own drain_events would sleep through all of it
    # (min(timeout, 1 s)) and time out.
    acker = threading.Timer(0.05, received[0].ack)
    acker.start()
    prompt.drain_events(timeout=0.9)
    acker.join()
    assert [m.payload for m in received] == [{"n": 0}, {"n": 1}]
    received[1].ack()


def test_everything_else_is_the_connections(consumer) -> None:
    prompt, _, _ = consumer
    assert prompt.connected and prompt.transport is prompt._connection.transport


def test_the_worker_hosts_consumer_runs_the_prompt_loop() -> None:
    # Celery uses the loop a Consumer class sets (consumer.py: "if not hasattr(self, 'loop')").
    assert _PromptConsumer.loop is _prompt_synloop


def test_a_warm_stop_of_the_worker_host_logs_no_error(base_values: dict[str, Any], tmp_path: Path) -> None:
    """SIGTERM stops every worker of the host while its consumer may be reading the broker
    connection the stop closes: the read's failure ends the loop quietly (three stops, each
    of which logged an "Unrecoverable error" about two times in three before)."""
    redis = RedisServer(password="host-stop").start()
    try:
        values = {**base_values, "broker_url": redis.url, "result_backend_url": redis.url}
        for _ in range(3):
            host = WorkerHostProcess(
                {"sync": 4, "send": 4, "delete": 2, "periodic": 1, "webhooks": 2},
                env=worker_env(env_for(values)),
                log_dir=tmp_path,
            )
            host.start()
            time.sleep(1)
            host.stop()
            log = host.log_text()
            assert "stopping (waiting for running tasks)" in log
            assert "Unrecoverable error" not in log and "Traceback" not in log, log[-3000:]
    finally:
        redis.stop()
