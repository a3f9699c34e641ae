"""Bearer API keys with roles; secrets are compared in constant time and never logged."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

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


def bearer_key(authenticator: Authenticator, authorization: str) -> ApiKey:
    """The known key an Authorization header carries; 401 if none. The middleware asks
    this of every `/v1` request, before its body is read."""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            401, "unauthorized", "send Authorization: Bearer <api key>", UNAUTHORIZED_HEADERS
        )
    key = authenticator.authenticate(token.strip())
    if key is None:
        raise ApiError(401, "unauthorized", "unknown API key", UNAUTHORIZED_HEADERS)
    return key


def key_for(authenticator: Authenticator, authorization: str, allowed: frozenset[str]) -> ApiKey:
    """The key an Authorization header carries, if its role is allowed (admins always
    are); 401 or 403 if not. The routes' dependencies and the fast lane both check so."""
    key = bearer_key(authenticator, authorization)
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


# The dependencies that check a key, with the roles each admits: read when a request is
# refused before they ran (below).
GUARDS: dict[Callable[..., Any], frozenset[str]] = {}


F = TypeVar("F", bound=Callable[..., Any])


def guards(allowed: frozenset[str]) -> Callable[[F], F]:
    """Marks a dependency as one that calls `authorise(request, allowed)`."""

    def mark(dependency: F) -> F:
        GUARDS[dependency] = allowed
        return dependency

    return mark


def require(*roles: Role) -> Callable[[Request], Awaitable[ApiKey]]:
    """A dependency that admits keys of these roles (admins are always admitted)."""
    allowed = frozenset(roles)

    @guards(allowed)
    async def dependency(request: Request) -> ApiKey:
        return authorise(request, allowed)

    return dependency


def refusal_before(request: Request) -> ApiError | None:
    """The 401 or 403 its route's key check gives this request, where a body that is not
    JSON, or a parameter out of bounds, refused it before the check ran: FastAPI reads
    both first, and a caller with no key, or a storefront's, learnt of its body's faults
    (`400 malformed_json`), where it should hear that it may not (a walkthrough)."""
    dependant = getattr(request.scope.get("route"), "dependant", None)
    pending = [dependant] if dependant is not None else []
    while pending:
        for dependency in pending.pop().dependencies:
            allowed = GUARDS.get(dependency.call)
            if allowed is not None:
                try:
                    key = authorise(request, allowed)
                except ApiError as refused:
                    return refused
                return _other_supplier(key, request.path_params.get("supplier_id"))
            pending.append(dependency)
    return None


def _other_supplier(key: ApiKey, supplier_id: object) -> ApiError | None:
    """A supplier's key on another supplier's route (its stock, its uploads), as those
    routes refuse it: their body's faults were told first (a review)."""
    if key.role == "supplier" and supplier_id is not None and key.supplier_id != supplier_id:
        return ApiError(403, "forbidden", "this key acts for another supplier")
    return None
