"""Errors as RFC 9457 problem details (application/problem+json): a status, a title, a detail,
and for invalid input one entry per problem naming its field."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from cai.errors import BadInput, Conflict, NotFound

MEDIA_TYPE = "application/problem+json"
TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    422: "Unprocessable content",
    429: "Too many requests",
}


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[str] = []
    """One line per problem, each naming its field (or a YAML file's line)."""


def problem(
    status: int, detail: str, errors: list[str] | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = Problem(title=TITLES.get(status, "Error"), status=status, detail=detail, errors=errors or [])
    return JSONResponse(body.model_dump(), status_code=status, media_type=MEDIA_TYPE, headers=headers)


def install(app: FastAPI) -> None:
    """Route every error the API can raise to a problem response."""

    async def not_found(request: Request, exc: Exception) -> JSONResponse:
        return problem(404, str(exc))

    async def bad_input(request: Request, exc: Exception) -> JSONResponse:
        problems = exc.problems if isinstance(exc, BadInput) else [str(exc)]
        return problem(422, problems[0] if len(problems) == 1 else f"{len(problems)} problems", problems)

    async def conflict(request: Request, exc: Exception) -> JSONResponse:
        return problem(409, str(exc))

    async def invalid(request: Request, exc: Exception) -> JSONResponse:
        errors: list[Any] = list(exc.errors()) if isinstance(exc, RequestValidationError) else []
        lines = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors]
        # A body that is not a JSON object at all is malformed (400); one whose fields break the
        # schema is unprocessable (422), with each field named.
        malformed = any(
            e.get("type") == "json_invalid" or tuple(e.get("loc", ())) == ("body",) for e in errors
        )
        status = 400 if malformed else 422
        return problem(status, lines[0] if len(lines) == 1 else f"{len(lines)} problems", lines)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = exc.detail if isinstance(exc, HTTPException) else "error"
        headers = getattr(exc, "headers", None)
        if status == 404 and detail == "Not Found":
            detail = f"there is no API operation at {request.url.path}"
        return problem(status, str(detail), headers=headers)

    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(BadInput, bad_input)
    app.add_exception_handler(Conflict, conflict)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
