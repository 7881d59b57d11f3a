"""API key check shared by HTTP (`Authorization: Bearer KEY`) and gRPC (`authorization` metadata)."""

from __future__ import annotations

import hmac

from autoglm_trt.serve.errors import ServeError


def bearer_ok(header: str | None, api_key: str | None) -> bool:
    """True when no key is configured, or the header is `Bearer <key>` (constant-time compare)."""
    if api_key is None:
        return True
    if not header:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), api_key.encode())


def check_bearer(header: str | None, api_key: str | None) -> None:
    if not bearer_ok(header, api_key):
        raise ServeError("invalid or missing API key: send `Authorization: Bearer <key>`",
                         status=401, code="invalid_api_key")
