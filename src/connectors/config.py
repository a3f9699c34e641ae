"""Checking a supplier's connector settings when they are saved, not when they are used."""

from __future__ import annotations

import io
import math
from typing import Any

from connectors.normalise import MAX_FACTOR
from connectors.parsers import FORMATS, OPTION_NAMES, parse
from connectors.parsers.records import shown
from connectors.transports import TRANSPORTS, transport_for
from connectors.webhooks import MAX_TOLERANCE_SECONDS
from ledger.delivery import lone_surrogate
from ledger.handlers.reports import MAX_QUANTITY
from ledger.mapping import BASE_UNITS, unit_key


class _NoState:
    def get(self, name: str) -> Any:
        return None

    def set(self, name: str, value: Any) -> None:
        pass


# Connector settings nested deeper than this are a mistake (and are walked without recursion).
DEEPEST_SETTING = 32
# Durations beyond ten years are a mistake, and overflow the time arithmetic that uses
# them (a timedelta, a float of seconds).
LONGEST_SECONDS = 10 * 365 * 24 * 3600

# The keys each part of the settings may hold: a misspelt one was kept, and the setting it
# meant silently left at its default. The transports' sections are checked by their own
# models; the options are those any format's parser reads, as a parser leaves the others'
# alone.
CONNECTOR_KEYS = frozenset(
    {
        *("format", *TRANSPORTS, "schedule", "breaker", "units", "options", "webhook"),
        *("upc_fallback", "max_quantity", "max_age_seconds"),
    }
)
SCHEDULE_KEYS = frozenset({"interval_seconds", "jitter"})
BREAKER_KEYS = frozenset({"failures_to_open", "cooldown_seconds"})
WEBHOOK_KEYS = frozenset({"secret_ref", "tolerance_seconds", "format", "options"})


def _check_values(connector: dict[str, Any]) -> None:
    """Refuses what PostgreSQL's JSON cannot hold, text with a NUL and numbers that are not
    finite (NaN, Infinity: JSON bodies may carry them), and settings nested too deeply:
    the settings are kept in the supplier's terms, which the stock view stores as JSON, and
    the view would stop at them. Nor text with a lone UTF-16 surrogate (JSON's "\\ud800"),
    which UTF-8 cannot encode: the supplier's event could not be saved, a 500."""
    stack: list[tuple[Any, int]] = [(connector, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise ValueError("connector settings must not hold a NUL character (\\u0000)")
            if lone_surrogate(value):
                raise ValueError(
                    "connector settings must not hold a lone UTF-16 surrogate (such as \\ud800)"
                )
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ValueError(f"connector settings hold finite numbers only, not {value}")
        elif isinstance(value, dict | list | tuple):
            if depth >= DEEPEST_SETTING:
                raise ValueError(f"connector settings nest at most {DEEPEST_SETTING} deep")
            items = [*value, *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


def _known_keys(where: str, section: dict[str, Any], known: frozenset[str]) -> None:
    for key in section:
        if key not in known:
            raise ValueError(
                f"{where}{key}: Extra inputs are not permitted; known: {', '.join(sorted(known))}"
            )


def _positive(
    section: dict[str, Any],
    name: str,
    kind: type[float] | type[int],
    at_most: int | None = None,
    where: str = "",
) -> None:
    if name in section:
        value = section[name]
        # A bool is an int to Python, and a string is no number: neither may reach the
        # comparisons below, nor the arithmetic of the deliveries.
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{where}{name} must be a positive number, not {shown(value)}")
        if kind is int and not isinstance(value, int):
            raise ValueError(f"{where}{name} must be a whole number, not {shown(value)}")
        if at_most is not None and value > at_most:
            raise ValueError(f"{where}{name} is at most {at_most}, not {shown(value)}")


def check_connector(connector: dict[str, Any]) -> None:
    """Raises ValueError naming what is wrong with these connector settings."""
    _check_values(connector)
    _known_keys("", connector, CONNECTOR_KEYS)
    if "format" in connector and connector["format"] not in FORMATS:
        raise ValueError(f"format is one of {', '.join(FORMATS)}")
    for transport_kind in TRANSPORTS:
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
    _known_keys("options.", supplier_options, OPTION_NAMES)
    webhook = connector.get("webhook") or {}
    _known_keys("webhook.", webhook, WEBHOOK_KEYS)
    webhook_options = webhook.get("options") or {}
    if not isinstance(webhook_options, dict):
        raise ValueError("webhook.options must be an object")
    _known_keys("webhook.options.", webhook_options, OPTION_NAMES)
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
    _known_keys("schedule.", schedule, SCHEDULE_KEYS)
    _positive(schedule, "interval_seconds", float, LONGEST_SECONDS, "schedule.")
    jitter = schedule.get("jitter", 0)
    if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
        raise ValueError(f"schedule.jitter is a number from 0 to below 1, not {shown(jitter)}")
    breaker = connector.get("breaker") or {}
    _known_keys("breaker.", breaker, BREAKER_KEYS)
    _positive(breaker, "failures_to_open", int, where="breaker.")
    _positive(breaker, "cooldown_seconds", float, LONGEST_SECONDS, "breaker.")
    # A larger factor failed every delivery that named its unit, at staging.
    named: dict[str, str] = {}
    for unit, factor in (connector.get("units") or {}).items():
        if (
            not isinstance(unit, str)
            or isinstance(factor, bool)
            or not isinstance(factor, int)
            or not 1 <= factor <= MAX_FACTOR
        ):
            raise ValueError(
                f"units maps a unit name to a whole number of base units, 1 to {MAX_FACTOR}:"
                f" {unit!r}: {shown(factor)}"
            )
        # Units compare trimmed and in upper case: "cs" and "CS" are one unit, and one of
        # the two factors was silently dropped.
        key = unit_key(unit)
        if (same := named.setdefault(key, unit)) != unit:
            raise ValueError(f"units names one unit twice: {same!r} and {unit!r}")
        # A base unit is one piece wherever it is written; the table's factor would win.
        if key in BASE_UNITS:
            raise ValueError(f"units cannot count {unit!r} otherwise: it is a base unit, one piece")
    if not isinstance(connector.get("upc_fallback", False), bool):
        raise ValueError("upc_fallback is true or false")
    # The ledger refuses a quantity past its own MAX_QUANTITY whatever a supplier's ceiling
    # says; and a delivery multiplies quantities up to the ceiling by a unit's factor, in
    # PostgreSQL bigints, which a ceiling up to MAX_QUANTITY keeps within.
    _positive(connector, "max_quantity", int, MAX_QUANTITY)
    _positive(connector, "max_age_seconds", int, LONGEST_SECONDS)
    if webhook and not str(webhook.get("secret_ref", "")).startswith(("env:", "file:")):
        raise ValueError("webhook.secret_ref is env:NAME or file:PATH")
    # A signature is remembered against replays for so long: a request must expire first.
    _positive(webhook, "tolerance_seconds", int, MAX_TOLERANCE_SECONDS, "webhook.")
    if "format" in webhook and webhook["format"] not in FORMATS:
        raise ValueError(f"webhook.format is one of {', '.join(FORMATS)}")
    transport = transport_for("check", connector, state=_NoState(), strict=True)
    if transport is not None:
        transport.close()
