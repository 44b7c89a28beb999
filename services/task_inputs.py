"""The parameters each task type accepts. The API validates a request body against the same
model before it queues anything, and the worker validates again before it acts, so a
message put on a queue by anything else cannot make a task do something odd."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    model_validator,
)

from services.models import ID_PATTERN, is_id

_EMAIL = re.compile(
    r"^[^@\s<>(),;:\"\[\]]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _email(value: str) -> str:
    # Deliberately not email-validator: it refuses special-use domains (.test, .local,
    # .internal) that self-hosted and test mail servers use every day.
    value = value.strip()
    if len(value) > 320 or not _EMAIL.match(value):
        raise ValueError(f"not an email address: {value!r}")
    return value


# The pattern is in the schema too, so the OpenAPI document says what an address may be.
EmailAddress = Annotated[str, Field(max_length=320, pattern=_EMAIL.pattern), AfterValidator(_email)]

FolderName = Field(min_length=1, max_length=1000)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SyncParams(_Strict):
    folders: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="Only these folders (by name); all folders when omitted.",
    )
    full: StrictBool = Field(default=False, description="Ignore stored sync state and rebuild.")

    @model_validator(mode="after")
    def _names(self) -> SyncParams:
        for name in self.folders or []:
            if not name or len(name) > 1000 or "\x00" in name:
                raise ValueError("folder names must be 1 to 1000 characters")
        return self


class VerifyParams(_Strict):
    pass


class SendParams(_Strict):
    """A send task's parameters: its outbox row, which holds the message the API built from
    services.send.request.SendRequest. The message itself never rides the broker."""

    outbox_id: str = Field(pattern=r"^[0-9a-fA-F-]{36}$")
    message_id: str = Field(max_length=998)


def _message_id(value: str) -> str:
    if not is_id(value):  # checked before the text reaches a query (NUL, length, shape)
        raise ValueError("not a message id")
    return value


MessageId = Annotated[str, AfterValidator(_message_id)]

#: The same check as :data:`MessageId` (a stricter ``$``: no trailing newline), made by
#: pydantic's core from the pattern instead of a Python call per id: a delete carries up
#: to 5,000 ids, validated by the API and again by the worker.
DeleteMessageId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


class DeleteRequest(_Strict):
    """What a client sends to ``POST /api/accounts/{id}/delete``."""

    message_ids: list[DeleteMessageId] = Field(
        min_length=1, max_length=5000, description="Mailroom message ids of this account."
    )
    permanent: StrictBool = Field(
        default=False,
        description="Delete for good instead of moving to Trash (messages already in Trash "
        "are always deleted for good).",
    )


class DeleteParams(DeleteRequest):
    """The delete task's parameters: the request, plus what the API read when it accepted
    it (so a retry of a move never takes a message it moved itself for one in Trash)."""

    in_trash: list[DeleteMessageId] = Field(default_factory=list, max_length=5000)


class SpamCheckRequest(_Strict):
    """What a client sends to ``POST /api/accounts/{id}/spam-check``: message ids, or a
    folder (optionally only its messages never checked)."""

    message_ids: list[MessageId] | None = Field(
        default=None, min_length=1, max_length=1000, description="Mailroom message ids of this account."
    )
    folder: str | None = Field(default=None, min_length=1, max_length=1000, description="A folder's name.")
    only_unscored: StrictBool = Field(default=False, description="With folder: only messages never checked.")

    @model_validator(mode="after")
    def _one_target(self) -> SpamCheckRequest:
        if (self.message_ids is None) == (self.folder is None):
            raise ValueError("give either message_ids or folder")
        if self.folder is not None and "\x00" in self.folder:
            raise ValueError("folder names must not contain NUL")
        return self


class SpamCheckParams(SpamCheckRequest):
    """The check_spam task's parameters: the request, or with ``learn`` the messages a user
    labelled (the label is recorded before the task is queued) for the tenant's filter to
    learn from."""

    learn: Literal["spam", "ham"] | None = None

    @model_validator(mode="after")
    def _learn_ids(self) -> SpamCheckParams:
        if self.learn is not None and self.message_ids is None:
            raise ValueError("learn needs message_ids")
        return self
