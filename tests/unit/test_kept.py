"""What a refusal keeps of a refused record (ledger.delivery.kept)."""

from __future__ import annotations

from typing import Any

from ledger.delivery import CUT, KEPT_DEPTH, kept, kept_cheaply


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth):
        value = [value]
    return value


def test_a_plain_record_is_kept_as_it_is_in_a_copy_of_its_own() -> None:
    record = {"sku": "A1", "quantity": 5, "ratio": 0.5, "tags": ["x", None, True], "at": {"d": 1}}

    copy = kept(record)

    assert copy == record
    assert copy is not record
    assert copy["tags"] is not record["tags"]


def test_a_nul_becomes_u_fffd_in_text_and_in_names_and_the_record_is_left_alone() -> None:
    record = {"s\x00ku": "A\x001", "more": [{"u\x00": "\x00"}]}

    assert kept(record) == {"s\ufffdku": "A\ufffd1", "more": [{"u\ufffd": "\ufffd"}]}
    assert record == {"s\x00ku": "A\x001", "more": [{"u\x00": "\x00"}]}
    assert kept("a\x00") == "a\ufffd"


def test_containers_past_the_depth_kept_are_cut_even_thousands_deep() -> None:
    cut = kept({"extra": nested(100_000)})

    depth, value = 0, cut["extra"]
    while isinstance(value, list):
        depth, value = depth + 1, value[0]
    assert value == CUT
    assert depth == KEPT_DEPTH - 1  # the record itself is the first level
    assert kept(nested(KEPT_DEPTH - 1)) == nested(KEPT_DEPTH - 1)


def test_a_record_already_as_kept_is_kept_as_it_is_and_any_other_as_kept_keeps_it() -> None:
    plain = {"fields": {"sku": "A1", "quantity": 3, "unit": None}, "raw": {"line": "A1;3"}}
    assert kept_cheaply(plain) is plain
    for other in (
        {"s\x00ku": "A1"},  # a NUL in a key
        {"fields": {"sku": "A\x001"}},  # in a value, nested
        {"fields": {"raw": {"deeper": 1}}},  # nested deeper than records are
        {"quantity": 1.5},  # not a whole number: as `kept` keeps it
    ):
        assert kept_cheaply(other) == kept(other)
        assert kept_cheaply(other) is not other
