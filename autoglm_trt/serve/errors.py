"""Errors of the serving layer and their OpenAI JSON shape: {"error": {message, type, param, code}}."""

from __future__ import annotations

from autoglm_trt.errors import RequestError

# status -> (OpenAI error type, default code)
_KINDS = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    404: ("invalid_request_error", "not_found"),
    413: ("invalid_request_error", "request_too_large"),
    429: ("rate_limit_error", "rate_limit_exceeded"),
    499: ("invalid_request_error", "client_closed_request"),
    500: ("server_error", "internal_error"),
    503: ("service_unavailable", "model_not_ready"),
}


class ServeError(RequestError):
    """A request the server refuses; `code` is OpenAI's machine-readable error code."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message, status=status, param=param)
        self.code = code
        self.retry_after = retry_after


class QueueFullError(ServeError):
    def __init__(self, in_flight: int, capacity: int) -> None:
        super().__init__(f"the server is at capacity ({in_flight} requests in flight, at most "
                         f"{capacity} = max-num-seqs + max-queue); retry later", status=429,
                         retry_after=1)


class NotReadyError(ServeError):
    def __init__(self, detail: str = "the model is still loading") -> None:
        super().__init__(f"{detail}; retry when /health answers 200", status=503, retry_after=5)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    err_type, default_code = _KINDS.get(status, ("invalid_request_error" if status < 500 else
                                                 "server_error", None))
    return {"error": {"message": message, "type": err_type, "param": param,
                      "code": code if code is not None else default_code}}


def body_for(exc: RequestError) -> dict:
    return error_body(str(exc), exc.status, exc.param, getattr(exc, "code", None))
