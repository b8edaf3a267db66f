"""Router errors. Raised where they arise; ``handlers.error_middleware`` turns them into HTTP
responses with OpenAI-style bodies: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations


class RouterError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error type."""

    status = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}

    def body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.error_type,
                          "param": self.param, "code": self.code}}


class InvalidRequest(RouterError):
    """The request is malformed or asks for something the served model cannot do (400)."""

    status = 400
    error_type = "invalid_request_error"


class NotFound(RouterError):
    status = 404
    error_type = "not_found_error"


class MethodNotAllowed(RouterError):
    status = 405
    error_type = "invalid_request_error"


class Unauthorized(RouterError):
    """Missing or wrong API key (401)."""

    status = 401
    error_type = "authentication_error"

    def __init__(self, message: str = "missing or invalid API key (expected 'Authorization: "
                 "Bearer <key>')"):
        super().__init__(message, code="invalid_api_key",
                         headers={"WWW-Authenticate": 'Bearer realm="banaserve"'})


class Overloaded(RouterError):
    """The admission queue is full (429); the client should retry after ``retry_after_s``."""

    status = 429
    error_type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message, code="overloaded",
                         headers={"Retry-After": str(max(1, retry_after_s))})


class RequestTimeout(RouterError):
    """The request did not finish within the router's request timeout (504)."""

    status = 504
    error_type = "timeout_error"


class NoHealthyWorker(RouterError):
    """No worker can take the request right now (503)."""

    status = 503
    error_type = "service_unavailable"

    def __init__(self, message: str = "no healthy worker is available to serve the request"):
        super().__init__(message, code="no_healthy_worker")


class UpstreamError(RouterError):
    """The chosen worker failed before answering (502)."""

    status = 502
    error_type = "upstream_error"
