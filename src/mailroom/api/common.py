"""What every route module shares: the security declaration, error responses, pages."""

from __future__ import annotations

from typing import Any

from mailroom.schemas import ErrorResponse, ValidationErrorResponse

SECURITY: list[dict[str, list[Any]]] = [{"bearer": []}]

#: Error responses every authenticated route can give, declared once for the OpenAPI document.
ERRORS: dict[Any, Any] = {
    400: ErrorResponse,
    401: ErrorResponse,
    403: ErrorResponse,
    404: ErrorResponse,
    409: ErrorResponse,
    422: ValidationErrorResponse,
    # Every /api route counts against the tenant's rate limits (Retry-After says when).
    429: ErrorResponse,
    503: ErrorResponse,
}


def page_info(total: int, limit: int, offset: int) -> dict[str, Any]:
    next_offset = offset + limit if offset + limit < total else None
    return {"total": total, "limit": limit, "offset": offset, "next_offset": next_offset}
