"""Router errors. Raised where they arise; ``handlers.error_middleware`` turns them into HTTP
responses with OpenAI-style bodies: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations


class RouterError(Exception):
    """Base class: an error with an HTTP status and an OpenAI error type."""

    status = 500
    error_type = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

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
