"""Test-side building blocks: an API client bound to a key, a tenant kit, task polling."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from openapi_schema_validator import OAS31Validator
from sqlalchemy.orm import Session

from services import tenancy

FINAL_STATES = {"succeeded", "failed", "cancelled"}


class Api:
    """The Flask test client with one API key: every call goes through the real app."""

    def __init__(self, app: Any, key: str | None) -> None:
        self.client = app.test_client()
        self.key = key

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        headers.update(extra or {})
        return headers

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(path, headers=self._headers(kw.pop("headers", None)), **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.client.post(path, headers=self._headers(kw.pop("headers", None)), **kw)

    def patch(self, path: str, **kw: Any) -> Any:
        return self.client.patch(path, headers=self._headers(kw.pop("headers", None)), **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.client.delete(path, headers=self._headers(kw.pop("headers", None)), **kw)

    def task(self, task_id: str) -> dict[str, Any]:
        response = self.get(f"/api/tasks/{task_id}")
        assert response.status_code == 200, response.get_json()
        return response.get_json()  # type: ignore[no-any-return]

    def wait_task(
        self, task_id: str, *, states: set[str] | None = None, timeout: float = 60, where: Any = None
    ) -> dict[str, Any]:
        """Poll the task until it is in one of ``states`` (final states by default) or
        ``where(task)`` holds; fail with the last seen record on timeout."""
        states = states or FINAL_STATES
        deadline = time.monotonic() + timeout
        task: dict[str, Any] = {}
        while time.monotonic() < deadline:
            task = self.task(task_id)
            if (where is None and task["state"] in states) or (where is not None and where(task)):
                return task
            time.sleep(0.1)
        raise AssertionError(f"task {task_id} did not reach {states} within {timeout}s: {task}")


@dataclass
class TenantKit:
    tenant_id: str
    admin_id: str
    member_id: str
    admin: Api
    member: Api
    admin_key: str
    member_key: str


def make_tenant(session: Session, app: Any) -> TenantKit:
    tag = uuid.uuid4().hex[:10]
    tenant = tenancy.create_tenant(session, name=f"Tenant {tag}", slug=f"t-{tag}")
    admin = tenancy.create_user(session, tenant_id=tenant.id, email=f"admin@{tag}.test", role="admin")
    member = tenancy.create_user(session, tenant_id=tenant.id, email=f"member@{tag}.test", role="member")
    _, admin_key = tenancy.create_api_key(session, admin, name="admin")
    _, member_key = tenancy.create_api_key(session, member, name="member")
    return TenantKit(
        tenant_id=tenant.id,
        admin_id=admin.id,
        member_id=member.id,
        admin=Api(app, admin_key),
        member=Api(app, member_key),
        admin_key=admin_key,
        member_key=member_key,
    )


def error_of(response: Any) -> dict[str, Any]:
    """The ``error`` object of a response, asserting the one error shape."""
    body = response.get_json()
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["code"], str) and error["code"]
    assert isinstance(error["message"], str) and error["message"]
    if error["code"] == "validation_error":  # one entry per problem, whoever found it
        assert isinstance(error["details"], list) and error["details"], error
        for entry in error["details"]:
            assert {"loc", "msg", "type"} <= set(entry) and isinstance(entry["loc"], list), entry
    return error  # type: ignore[no-any-return]


def fields_of(details: list[dict[str, Any]]) -> list[str]:
    """The fields a validation error's ``details`` name, dotted (``"imap.host"``)."""
    return [".".join(str(p) for p in entry["loc"]) for entry in details]


def _closed(schema: Any) -> Any:
    """``schema`` with every object closed (``additionalProperties: false``), so that a
    field the API returns but the OpenAPI document does not describe fails validation."""
    if isinstance(schema, dict):
        closed = {key: _closed(value) for key, value in schema.items()}
        if closed.get("type") == "object" and "properties" in closed:
            closed["additionalProperties"] = False
        return closed
    if isinstance(schema, list):
        return [_closed(item) for item in schema]
    return schema


def response_validator(spec: dict[str, Any], path: str, method: str, status: str) -> OAS31Validator:
    """A validator of the JSON answer ``spec`` (the OpenAPI document) promises for ``status``
    of ``method`` ``path``, every object closed (:func:`_closed`)."""
    content = spec["paths"][path][method]["responses"][status]["content"]["application/json"]
    return OAS31Validator({**_closed(content["schema"]), "components": _closed(spec["components"])})
