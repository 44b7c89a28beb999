"""Schemathesis against ``/openapi.json``: every route and method, with a real key, on
PostgreSQL, in-process through the WSGI app. No response may be a 5xx, and every response
must be one the document declares (status code, content type, body shape).

Half of the generated cases get the ids of the tenant's real objects (an account on the
shared Dovecot, a stored message, a task, an outbox entry) instead of random ones, so the
fuzzer reaches past the 404 into the routes' own logic. Tasks it queues are cancelled at the
end; the account's SMTP points at a closed port so nothing it sends leaves the machine.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.orm import Session, sessionmaker

from services.db import transaction
from services.models import Folder, Message
from tests.servers.dovecot import DovecotServer
from tests.support import TenantKit, make_tenant

pytestmark = pytest.mark.slow

#: Examples per operation and mode: ~40 operations, so a few hundred requests per mode.
EXAMPLES = 6
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def fuzz_target(
    app: Any, sessions: sessionmaker[Session], dovecot: DovecotServer
) -> Iterator[tuple[TenantKit, dict[str, list[str]]]]:
    with transaction(sessions) as session:
        kit = make_tenant(session, app)
    user = "fz" + uuid.uuid4().hex[:10]
    dovecot.add_user(user, "pw-" + user)
    body: dict[str, Any] = {
        "email": f"{user}@example.test",
        "imap": {"host": "127.0.0.1", "port": dovecot.port, "tls": "none", "username": user},
        "smtp": {"host": "127.0.0.1", "port": 9, "tls": "none", "username": "u", "password": "p"},
    }
    body["imap"]["password"] = "pw-" + user
    account = kit.admin.post("/api/accounts", json=body).get_json()
    with transaction(sessions) as session:
        folder = Folder(tenant_id=kit.tenant_id, account_id=account["id"], name="INBOX")
        session.add(folder)
        session.flush()
        message = Message(
            tenant_id=kit.tenant_id, account_id=account["id"], folder_id=folder.id, uid=1, subject="hello"
        )
        session.add(message)
        session.flush()
        message_id = message.id
    task_id = kit.admin.post(f"/api/accounts/{account['id']}/verify").get_json()["task_id"]
    sent = kit.admin.post(f"/api/accounts/{account['id']}/send", json={"to": ["a@b.test"], "text": "x"})
    hook = kit.admin.post("/api/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["task.failed"]})
    ids = {
        "webhook_id": [hook.get_json()["id"]],
        "account_id": [account["id"]],
        "message_id": [message_id],
        "task_id": [task_id],
        "outbox_id": [sent.get_json()["outbox_id"]],
    }
    yield kit, ids
    kit.admin.post("/api/admin/cancel-all")
    for endpoint in kit.admin.get("/api/webhooks", query_string={"limit": 200}).get_json()["items"]:
        kit.admin.delete(f"/api/webhooks/{endpoint['id']}")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_the_api_answers_every_generated_request_as_documented(
    app: Any, fuzz_target: tuple[TenantKit, dict[str, list[str]]], mode: GenerationMode
) -> None:
    kit, ids = fuzz_target
    headers = {"Authorization": f"Bearer {kit.admin_key}"}
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), "every operation in the document must load"
    assert len(operations) >= 30
    seen: dict[str, Any] = {"requests": 0, "statuses": {}, "server_errors": [], "no_negative": []}
    failures: list[str] = []
    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            _use_real_ids(case, ids)
            response = case.call(headers=headers)
            seen["requests"] += 1
            seen["statuses"][response.status_code] = seen["statuses"].get(response.status_code, 0) + 1
            if response.status_code >= 500:
                seen["server_errors"].append((case.operation.label, response.status_code))
            case.validate_response(response, checks=CHECKS, headers=headers)

        try:
            run()
        except Unsatisfiable:
            # An operation without parameters or body has no invalid request to make.
            assert mode == GenerationMode.NEGATIVE, operation.label
            seen["no_negative"].append(operation.label)
        except Exception as exc:  # gather every operation's finding
            failures.append(f"{operation.label}: {_summary(exc)}")
    print(f"\nschemathesis {mode.value}: {len(operations)} operations, {seen}")
    assert not failures, "\n\n".join(failures)
    assert not seen["server_errors"]
    assert seen["requests"] >= EXAMPLES * len(operations) // 2
    assert len(seen["no_negative"]) <= 4  # /healthz, /readyz, /metrics, /docs


def _use_real_ids(case: Any, ids: dict[str, list[str]]) -> None:
    picker = random.Random(repr(case.path_parameters) + repr(case.query) + repr(case.body))
    if case.path_parameters and picker.random() < 0.5:
        for name in list(case.path_parameters):
            if name in ids:
                case.path_parameters[name] = picker.choice(ids[name])
    if case.operation.method.upper() == "DELETE" and case.operation.path == "/api/accounts/{account_id}":
        # Deleting the one real account would leave the rest of the run nothing real to use.
        case.path_parameters["account_id"] = str(uuid.uuid4())


def _summary(exc: BaseException) -> str:
    """A finding in a few lines: the check that failed and what it saw (not the 1 MB body)."""
    found = getattr(exc, "exceptions", None) or [exc]
    return "; ".join(f"{type(e).__name__}: {str(e)[:400]}" for e in found)
