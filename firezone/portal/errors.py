"""Errors the portal's domain layer raises; the web layer maps each to one HTTP status.

    PortalError
    ├── NotFound        404  unknown object (also: belongs to another account)
    ├── Conflict        409  duplicate name, object in use, managed object
    ├── Invalid         422  a field failed validation (names the field)
    ├── BadRequest      400  malformed request (not JSON, wrong types)
    ├── Unauthorized    401  missing / invalid / expired / revoked token
    └── Forbidden       403  authenticated but not allowed
"""

from __future__ import annotations


class PortalError(Exception):
    status = 500
    title = "Internal Server Error"

    def __init__(self, detail: str, *, field: str | None = None,
                 errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.errors = errors if errors is not None else ([{"field": field, "message": detail}] if field else [])


class NotFound(PortalError):
    status = 404
    title = "Not Found"

    @classmethod
    def of(cls, kind: str, ref: str) -> "NotFound":
        return cls(f"{kind} {ref!r} not found")


class Conflict(PortalError):
    status = 409
    title = "Conflict"


class Invalid(PortalError):
    status = 422
    title = "Unprocessable Content"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}", field=field)
        self.errors = [{"field": field, "message": message}]


class BadRequest(PortalError):
    status = 400
    title = "Bad Request"


class Unauthorized(PortalError):
    status = 401
    title = "Unauthorized"


class Forbidden(PortalError):
    status = 403
    title = "Forbidden"
