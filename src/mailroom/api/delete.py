"""``POST /api/accounts/{id}/delete``: move messages to Trash, or delete them for good."""

from __future__ import annotations

from flask import Response
from flask_openapi3 import APIBlueprint, Tag

from mailroom.api.accounts import queue_task
from mailroom.api.common import ERRORS, SECURITY
from mailroom.auth import principal
from mailroom.context import db_session
from mailroom.schemas import AccountPath, TaskAccepted
from services import mail_delete
from services.task_inputs import DeleteParams, DeleteRequest

tag = Tag(name="delete", description="Deleting messages on the IMAP server")
bp = APIBlueprint("delete", __name__, url_prefix="/api/accounts", abp_tags=[tag], abp_security=SECURITY)


@bp.post("/<account_id>/delete", responses={202: TaskAccepted, **ERRORS})
def delete_messages(path: AccountPath, body: DeleteRequest) -> tuple[Response, int]:
    """Queue a delete of up to 5,000 stored messages of this account. With `permanent`
    false they move to the `\\Trash` folder and keep their ids (messages already in Trash
    are deleted for good); with `permanent` true they are expunged. Any id that is not a
    message of this account visible to the caller makes the whole request a 404 and
    nothing is queued. The task's result: `moved`, `deleted`, `gone` (ids the server or
    Mailroom no longer had) and `trash_folder`."""
    in_trash = mail_delete.check_deletable(db_session(), principal(), path.account_id, body.message_ids)
    # Built from values validated just above (the body, and ids read back from the
    # database), so not validated a second time: thousands of ids.
    params = DeleteParams.model_construct(
        message_ids=list(dict.fromkeys(body.message_ids)), permanent=body.permanent, in_trash=in_trash
    )
    return queue_task(path.account_id, "delete", params.model_dump(exclude_defaults=True))
