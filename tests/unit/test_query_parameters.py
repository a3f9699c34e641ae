"""Query parameters given twice: refused unless the route reads a list."""

from __future__ import annotations

from typing import Any

from api.app import create_app
from api.middleware import LIST_PARAMETERS, READ_ONCE, _repeated_parameter
from tests.conftest import make_settings


def _is_list(schema: dict[str, Any]) -> bool:
    return schema.get("type") == "array" or any(_is_list(arm) for arm in schema.get("anyOf", []))


def test_the_parameters_read_once_and_as_lists_are_those_the_routes_read() -> None:
    """As the OpenAPI document describes every route's query parameters."""
    paths = create_app(make_settings("postgresql://unused/unused")).openapi()["paths"]
    read = [
        (path, parameter["name"], _is_list(parameter["schema"]))
        for path, operations in paths.items()
        for operation in operations.values()
        for parameter in operation.get("parameters", [])
        if parameter["in"] == "query"
    ]
    assert {(path, name) for path, name, as_list in read if as_list} == LIST_PARAMETERS
    assert {name for _, name, _ in read} == READ_ONCE


def test_a_parameter_given_twice_is_named_unless_it_is_a_list() -> None:
    assert _repeated_parameter("/v1/reservations", b"status=held&status=expired") == "status"
    assert _repeated_parameter("/v1/reservations", b"status=held&limit=5") is None
    assert _repeated_parameter("/v1/reservations", b"limit=5&status=held&limit=") == "limit"
    assert _repeated_parameter("/v1/availability", b"sku=A&sku=B") is None
    assert _repeated_parameter("/v1/availability/", b"sku=A&sku=B&min_position=1") is None
    assert _repeated_parameter("/v1/availability", b"sku=A&min_position=1&min_position=2") == (
        "min_position"
    )
    assert _repeated_parameter("/v1/availability/A", b"sku=A&sku=B") == "sku"
    # A parameter no route reads is ignored, as once.
    assert _repeated_parameter("/metrics", b"collect[]=a&collect[]=b") is None
    assert _repeated_parameter("/readyz", b"x=1&x=2") is None
    # Read as Starlette reads it: percent-decoded names.
    assert _repeated_parameter("/v1/dead-letters", b"status=open&st%61tus=all") == "status"
