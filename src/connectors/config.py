"""Checking a supplier's connector settings when they are saved, not when they are used."""

from __future__ import annotations

import io
import math
from typing import Any

from connectors.parsers import FORMATS, parse
from connectors.transports import transport_for
from connectors.webhooks import MAX_TOLERANCE_SECONDS


class _NoState:
    def get(self, name: str) -> Any:
        return None

    def set(self, name: str, value: Any) -> None:
        pass


# Connector settings nested deeper than this are a mistake (and are walked without recursion).
DEEPEST_SETTING = 32


def _check_values(connector: dict[str, Any]) -> None:
    """Refuses what PostgreSQL's JSON cannot hold, text with a NUL and numbers that are not
    finite (NaN, Infinity: JSON bodies may carry them), and settings nested too deeply:
    the settings are kept in the supplier's terms, which the stock view stores as JSON, and
    the view would stop at them."""
    stack: list[tuple[Any, int]] = [(connector, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise ValueError("connector settings must not hold a NUL character (\\u0000)")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"connector settings hold finite numbers only, not {value}")
        elif isinstance(value, dict | list | tuple):
            if depth >= DEEPEST_SETTING:
                raise ValueError(f"connector settings nest at most {DEEPEST_SETTING} deep")
            items = [*value, *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


def _positive(section: dict[str, Any], name: str, kind: type[float] | type[int]) -> None:
    if name in section:
        value = section[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ValueError(f"{name} must be a positive number, not {value!r}")
        if kind is int and not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, not {value!r}")


def check_connector(connector: dict[str, Any]) -> None:
    """Raises ValueError naming what is wrong with these connector settings."""
    _check_values(connector)
    if "format" in connector and connector["format"] not in FORMATS:
        raise ValueError(f"format is one of {', '.join(FORMATS)}")
    for transport_kind in ("poll", "folder", "sftp", "ftp"):
        own = connector.get(transport_kind)
        # The supplier's format is what its deliveries are read as: a transport's may
        # only agree with it.
        if (
            isinstance(own, dict)
            and "format" in own
            and own["format"] != connector.get("format", own["format"])
        ):
            raise ValueError(
                f"format {connector['format']!r} and {transport_kind}.format"
                f" {own['format']!r} differ"
            )
    for name, kind in (
        ("schedule", dict),
        ("breaker", dict),
        ("units", dict),
        ("options", dict),
        ("webhook", dict),
    ):
        if name in connector and not isinstance(connector[name], kind):
            raise ValueError(f"{name} must be an object")
    # Each parser checks the options of its own format and leaves the others': a bad one
    # is refused here, not by every delivery after it.
    supplier_options = connector.get("options") or {}
    webhook_options = (connector.get("webhook") or {}).get("options") or {}
    if not isinstance(webhook_options, dict):
        raise ValueError("webhook.options must be an object")
    checked = [("options", supplier_options)]
    if webhook_options:  # as a webhook reads them
        checked.append(("webhook.options", {**supplier_options, **webhook_options}))
    for where, options in checked:
        for format in FORMATS:
            try:
                parse(format, io.BytesIO(b""), options)
            except ValueError as error:
                problem = str(error).removeprefix("bad_option: ")
                raise ValueError(f"{where}: {problem}") from error
    schedule = connector.get("schedule") or {}
    _positive(schedule, "interval_seconds", float)
    if "jitter" in schedule and not 0 <= schedule["jitter"] < 1:
        raise ValueError("schedule.jitter is between 0 and 1")
    breaker = connector.get("breaker") or {}
    _positive(breaker, "failures_to_open", int)
    _positive(breaker, "cooldown_seconds", float)
    for unit, factor in (connector.get("units") or {}).items():
        if (
            not isinstance(unit, str)
            or isinstance(factor, bool)
            or not isinstance(factor, int)
            or factor < 1
        ):
            raise ValueError(f"units maps a unit name to a whole number of base units: {unit!r}")
    if not isinstance(connector.get("upc_fallback", False), bool):
        raise ValueError("upc_fallback is true or false")
    _positive(connector, "max_quantity", int)
    _positive(connector, "max_age_seconds", int)
    webhook = connector.get("webhook") or {}
    if webhook and not str(webhook.get("secret_ref", "")).startswith(("env:", "file:")):
        raise ValueError("webhook.secret_ref is env:NAME or file:PATH")
    _positive(webhook, "tolerance_seconds", int)
    if "format" in webhook and webhook["format"] not in FORMATS:
        raise ValueError(f"webhook.format is one of {', '.join(FORMATS)}")
    # A signature is remembered against replays for so long: a request must expire first.
    if webhook.get("tolerance_seconds", 0) > MAX_TOLERANCE_SECONDS:
        raise ValueError(f"webhook.tolerance_seconds is at most {MAX_TOLERANCE_SECONDS}")
    transport = transport_for("check", connector, state=_NoState())
    if transport is not None:
        transport.close()
