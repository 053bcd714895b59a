"""API-key check for the /v1 routes.

Clients send the key as `Authorization: Bearer KEY` (what the openai package does) or `x-api-key: KEY`.
The comparison runs in constant time so response timing does not leak how much of a guess was right.
"""

from __future__ import annotations

import hmac

from .config import ApiError


def presented_key(authorization: str | None, x_api_key: str | None) -> str | None:
    """The key a request carries, from either header; None when it carries none."""
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    if x_api_key and x_api_key.strip():
        return x_api_key.strip()
    return None


def key_matches(expected: str, given: str | None) -> bool:
    if given is None:
        return False
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


def check_key(expected: str | None, authorization: str | None, x_api_key: str | None) -> None:
    """Raise a 401 ApiError unless the server has no key or the request carries the right one."""
    if expected is None:
        return
    given = presented_key(authorization, x_api_key)
    if not key_matches(expected, given):
        what = "no API key was sent" if given is None else "the API key is wrong"
        raise ApiError(f"{what}; send it as 'Authorization: Bearer KEY'", status=401,
                       code="invalid_api_key")
