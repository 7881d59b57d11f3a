"""Errors that reach the user as one clear line (CLI exit code 2, HTTP 4xx), never a traceback."""


class UserError(Exception):
    """A mistake the user can fix: a bad path, a wrong config, an unreadable image.

    The message says what is wrong and, where it helps, what to do instead.
    """


class RequestError(UserError):
    """A bad request to the engine or the server (maps to HTTP 400 unless `status` says otherwise)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
