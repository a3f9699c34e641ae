"""What a stream sends for each share of changes, given what it has already sent."""

from __future__ import annotations

import json
from typing import Any

from api.stream import Changed, deliver
from projections.entries import StockEntry


def render(entry: StockEntry, position: int) -> dict[str, Any]:
    return {"sku": entry.sku, "position": position}


def parsed(texts: list[str]) -> list[dict[str, Any]]:
    events = []
    for text in texts:
        fields = dict(line.split(": ", 1) for line in text.strip().split("\n"))
        events.append({**fields, "data": json.loads(fields["data"])})
    return events


ENTRIES = {"B": StockEntry("B", 0), "A": StockEntry("A", 0)}


def test_a_share_that_follows_on_ends_with_its_position_as_the_id() -> None:
    """On its last event only: a client cut off after A has not seen B, and must not say
    it has when it reconnects."""
    texts, seen = deliver(Changed(10, 12, ENTRIES), 10, render)
    assert seen == 12
    assert parsed(texts) == [
        {"event": "availability", "data": {"sku": "A", "position": 12}},
        {"event": "availability", "id": "12", "data": {"sku": "B", "position": 12}},
    ]


def test_a_share_already_sent_is_not_sent_again_and_an_overlapping_one_is() -> None:
    assert deliver(Changed(8, 10, ENTRIES), 10, render) == ([], 10)
    texts, seen = deliver(Changed(8, 11, {"A": ENTRIES["A"]}), 10, render)
    assert (len(texts), seen) == (1, 11)


def test_a_share_that_starts_past_what_was_sent_goes_without_an_id() -> None:
    """The feed was ahead of the stream's catch-up: what lies between comes in the feed's
    next share. Until then no id may claim the stream has seen it, or a client that
    reconnects from that id would never get it."""
    texts, seen = deliver(Changed(12, 15, {"A": ENTRIES["A"]}), 10, render)
    assert seen == 10
    assert parsed(texts) == [{"event": "availability", "data": {"sku": "A", "position": 15}}]


def test_too_many_changes_are_a_reset() -> None:
    texts, seen = deliver(Changed(10, 20, None), 10, render)
    assert seen == 20
    assert parsed(texts) == [
        {"event": "reset", "id": "20", "data": {"position": 20, "reason": "too_many_changes"}}
    ]
