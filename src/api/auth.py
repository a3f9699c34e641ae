"""Bearer API keys with roles; secrets are compared in constant time and never logged."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request

from api.errors import ApiError
from api.settings import ApiKey, Role

UNAUTHORIZED_HEADERS = {"WWW-Authenticate": "Bearer"}


class Authenticator:
    def __init__(self, keys: list[ApiKey]) -> None:
        self._keys = [(key.secret.get_secret_value().encode(), key) for key in keys]

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key with this secret; every key is compared, so timing says nothing."""
        offered = secret.encode()
        found = None
        for expected, key in self._keys:
            if hmac.compare_digest(offered, expected):
                found = key
        return found


def key_for(authenticator: Authenticator, authorization: str, allowed: frozenset[str]) -> ApiKey:
    """The key an Authorization header carries, if its role is allowed (admins always
    are); 401 or 403 if not. The routes' dependencies and the fast lane both check so."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "unauthorized", "send Authorization: Bearer <api key>", UNAUTHORIZED_HEADERS
        )
    key = authenticator.authenticate(token.strip())
    if key is None:
        raise ApiError(401, "unauthorized", "unknown API key", UNAUTHORIZED_HEADERS)
    if key.role not in allowed and key.role != "admin":
        raise ApiError(403, "forbidden", f"{_article(key.role)} {key.role} key cannot do this")
    return key


def _article(role: str) -> str:
    """The article before a role's name: "an auditor key", "an oms key" (O-M-S, said
    letter by letter), "a supplier key"."""
    return "an" if role[0] in "aeiou" else "a"


def authorise(request: Request, allowed: frozenset[str]) -> ApiKey:
    """The request's key if its role is allowed (admins always are); 401 or 403 if not."""
    authenticator: Authenticator = request.app.state.authenticator
    key = key_for(authenticator, request.headers.get("authorization", ""), allowed)
    request.state.principal = key.name
    return key


def require(*roles: Role) -> Callable[[Request], Awaitable[ApiKey]]:
    """A dependency that admits keys of these roles (admins are always admitted)."""
    allowed = frozenset(roles)

    async def dependency(request: Request) -> ApiKey:
        return authorise(request, allowed)

    return dependency
