"""The event store's transcoder reads exactly what the library's would, only faster."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from enum import Enum, IntEnum
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import JSONTranscoder, TranscodingNotRegisteredError
from hypothesis import given
from hypothesis import strategies as st

from ledger.application import InventoryLedger, LedgerTranscoder
from ledger.reservation import Line
from ledger.stock import ObservationOutcome, Position
from ledger.supplier import SupplierTerms


class Level(IntEnum):
    LOW = 1
    HIGH = 2


@pytest.fixture(scope="module")
def transcoders() -> tuple[LedgerTranscoder, JSONTranscoder]:
    app = InventoryLedger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, allow_in_memory=True)
    ours = app.mapper.transcoder
    assert isinstance(ours, LedgerTranscoder)
    library = JSONTranscoder()
    app.register_transcodings(library)
    return ours, library


moments = st.datetimes(
    min_value=datetime(1990, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=9))]),
)
typed = st.one_of(
    st.uuids(),
    moments,
    st.decimals(allow_nan=False, allow_infinity=False),
    st.builds(
        Position,
        quantity=st.integers(0, 10**9),
        observed_at=st.none() | moments,
        source=st.text(max_size=8),
        held=st.dictionaries(st.integers(0, 2**40), st.integers(1, 10**6), max_size=4),
        committed=st.integers(0, 10**6),
        unreported=st.dictionaries(st.integers(0, 2**40), st.integers(-(10**6), 10**6)),
    ),
    st.builds(Line, sku=st.text(min_size=1, max_size=10), quantity=st.integers(1, 100)),
    # A transcoding whose output holds anything (the supplier's connector settings).
    st.builds(
        SupplierTerms,
        name=st.text(max_size=8),
        connector=st.dictionaries(
            st.text(max_size=6),
            st.none() | st.floats(allow_nan=False) | st.integers() | st.text(max_size=6),
            max_size=3,
        ),
    ),
)
plain = (
    st.none()
    | st.booleans()
    | st.sampled_from([*ObservationOutcome, *Level])
    | st.integers()  # beyond 64 bits too: orjson would read those as floats
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
documents = st.recursive(
    plain | typed,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@given(document=st.dictionaries(st.text(max_size=10), documents, max_size=8))
def test_any_stored_state_decodes_as_the_library_decodes_it(
    transcoders: tuple[LedgerTranscoder, JSONTranscoder], document: dict[str, Any]
) -> None:
    ours, library = transcoders
    stored = library.encode(document)
    assert ours.encode(document) == stored  # what is written does not change
    assert ours.decode(stored) == library.decode(stored) == document


def test_what_orjson_refuses_is_decoded_the_librarys_way(
    transcoders: tuple[LedgerTranscoder, JSONTranscoder],
) -> None:
    ours, library = transcoders
    for big in (2**64, 2**70, -(2**63) - 1, 10**30):
        huge = {"quantity": big, "at": datetime(2026, 1, 2, tzinfo=UTC), "deep": [[1, big]]}
        decoded = ours.decode(library.encode(huge))
        assert decoded == huge
        assert type(decoded["quantity"]) is int
        assert type(decoded["deep"][0][1]) is int
    odd = ours.decode(
        b'{"ratio": NaN, "id": {"_type_": "uuid_hex", "_data_": "' + b"a" * 32 + b'"}}'
    )
    assert math.isnan(odd["ratio"])
    assert odd["id"] == UUID("a" * 32)


def test_an_unknown_type_is_refused_and_a_lookalike_dict_is_left_alone(
    transcoders: tuple[LedgerTranscoder, JSONTranscoder],
) -> None:
    ours, library = transcoders
    unknown = b'{"x": {"_type_": "no_such_type", "_data_": 1}}'
    for transcoder in (ours, library):
        with pytest.raises(TranscodingNotRegisteredError, match="no_such_type"):
            transcoder.decode(unknown)
    for lookalike in (
        b'{"x": {"_type_": "decimal_str", "_data_": "1.5", "other": 1}}',
        b'{"x": {"_type_": "datetime_iso", "other": "2026-01-01T00:00:00+00:00"}}',
        b'{"_type_": "datetime_iso", "_data_x": 1}',
    ):
        assert ours.decode(lookalike) == library.decode(lookalike)
    assert ours.decode(b'{"d": {"_type_": "decimal_str", "_data_": "1.5"}}') == {
        "d": Decimal("1.5")
    }


def test_orjson_writes_what_it_writes_as_the_library_does(
    transcoders: tuple[LedgerTranscoder, JSONTranscoder], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event's state is written by orjson, not handed to the library's encoder: a
    change that made every save take the slow way would fail here."""
    ours, library = transcoders
    state = {
        "timestamp": datetime(2026, 12, 4, 3, 33, 22, 123456, tzinfo=UTC),
        "supplier_id": "acme",
        "quantity": 120,
        "outcome": ObservationOutcome.APPLIED,
        "lines": [Line("SKU-1", 2, {"acme": 2}), Line("SKU-2", 1, {"acme": 1})],
        "position": Position(5, None, "feed", {17: 2}, 0, {}, (("2026-02-01", 5), (None, 1))),
        "cause": {"actor": "oms", "kind": "order", "ref": "é\u2028\x00"},
    }
    expected = library.encode(state)
    monkeypatch.setattr(JSONTranscoder, "encode", lambda self, obj: pytest.fail("slow way"))
    assert ours.encode(state) == expected


def test_what_orjson_would_write_otherwise_is_written_the_librarys_way(
    transcoders: tuple[LedgerTranscoder, JSONTranscoder],
) -> None:
    ours, library = transcoders

    class Colour(Enum):
        RED = "red"

    class Ordered(dict[str, Any]):
        pass

    for value in (
        {"ratio": 1e16, "small": 1e-05, "negative_zero": -0.0},
        {"id": UUID("a" * 32)},
        {"deep": Ordered(x=[(1, 2.5)])},
        {"terms": SupplierTerms("acme", connector={"jitter": 0.1, "id": UUID("b" * 32)})},
        {"big": 2**64, "keys": {1: "one"}},
    ):
        assert ours.encode(value) == library.encode(value)

    class Items(dict[str, Any]):
        def items(self) -> Any:
            return [("z", 9)]

    def nested(depth: int) -> dict[str, Any]:
        value: dict[str, Any] = {"a": 0}
        for _ in range(depth):
            value = {"a": value}
        return value

    for value in (
        {"x": Items(a=1)},  # the library writes what `items()` gives
        {"deep": nested(340)},  # beyond orjson's limit, within the library's
        {"position": Position(5, None, "feed", {17: 2}, 1e-05, {})},
        {"position": Position(5, None, "feed", {17: 2.5}, 0, {})},
        {"position": Position(5, None, UUID(int=1), {}, 0, {})},  # type: ignore[arg-type]
        {"line": Line("SKU", 1, {"north": 1}, {"south": UUID(int=2)})},  # type: ignore[dict-item]
    ):
        assert ours.encode(value) == library.encode(value)
    # Unknown types, lone surrogates, a cycle.
    refusals = (TranscodingNotRegisteredError, UnicodeEncodeError, ValueError)
    cycle: list[Any] = []
    cycle.append(cycle)
    for refused in ({"colour": Colour.RED}, {"ids": {1, 2}}, {"x": "\ud800"}, {"c": cycle}):
        with pytest.raises(refusals) as ours_error:
            ours.encode(refused)
        with pytest.raises(refusals) as library_error:
            library.encode(refused)
        assert type(ours_error.value) is type(library_error.value)


def test_the_state_a_view_keeps_is_the_state_a_snapshot_keeps(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """LedgerSnapshot.state_of (each changed aggregate's state in the views) records what
    `take` does, class version included, for each kind of aggregate."""
    from ledger.base import Cause, LedgerSnapshot
    from ledger.reservation import Reservation
    from ledger.stock import Allocation, StockItem
    from ledger.supplier import Supplier

    at = datetime(2026, 3, 1, tzinfo=UTC)
    cause = Cause("a", "r", "c")
    item = StockItem.register("SKU-1", at, cause)
    item.observe("s1", 5, at, SupplierTerms("s1"), at, cause)
    held = Reservation.place(
        "oms", "k", "o", "f", [("SKU-1", 1, [Allocation("s1", 1)])], at, at, cause
    )
    supplier = Supplier.register("s1", SupplierTerms("s1"), at, cause)
    for aggregate in (item, held, supplier):
        state = LedgerSnapshot.state_of(aggregate)
        assert state == LedgerSnapshot.take(aggregate).state
        assert not {"_id", "_version", "_pending_events"} & set(state)
    monkeypatch.setattr(StockItem, "class_version", 2, raising=False)
    assert LedgerSnapshot.state_of(item) == LedgerSnapshot.take(item).state
    assert LedgerSnapshot.state_of(item)["class_version"] == 2


def test_a_snapshot_taken_before_incoming_stock_was_kept_reads_as_expecting_none(
    transcoders: tuple[LedgerTranscoder, JSONTranscoder],
) -> None:
    ours, library = transcoders
    written = library.encode({"position": Position(5, None, "feed", {17: 2}, 0, {9: -1})})
    before = written.replace(b',"incoming":[]', b"")
    assert before != written  # as a snapshot was written before

    assert ours.decode(before)["position"] == Position(5, None, "feed", {17: 2}, 0, {9: -1}, ())
    kept = Position(5, None, "feed", {}, 0, {}, (("2026-02-01", 5),))
    assert ours.decode(ours.encode({"position": kept}))["position"] == kept


def test_a_snapshot_taken_before_net_commitments_were_kept_reads_as_holding_none(
    transcoders: tuple[LedgerTranscoder, JSONTranscoder],
) -> None:
    ours, library = transcoders
    kept = Position(5, None, "feed", {17: 2}, 0, {9: -1}, (), 4)
    written = library.encode({"position": kept})
    before = written.replace(b',"net_committed":4', b"")
    assert before != written  # as a snapshot was written before

    assert ours.decode(before)["position"] == Position(5, None, "feed", {17: 2}, 0, {9: -1})
    assert ours.decode(ours.encode({"position": kept}))["position"] == kept
    assert ours.decode(written)["position"] == kept


def test_a_snapshot_keeps_when_a_remap_last_set_a_level_and_one_taken_before_holds_none(
    transcoders: tuple[LedgerTranscoder, JSONTranscoder],
) -> None:
    ours, library = transcoders
    remapped = datetime(2026, 12, 6, 19, 0, tzinfo=UTC)
    kept = Position(0, remapped, "remap", {}, 0, {}, (), 0, True, remapped)
    plain = library.encode({"position": Position(5, None, "feed", {17: 2}, 0, {9: -1})})
    before = plain.replace(b',"remapped_at":null', b"")
    assert before != plain  # as a snapshot was written before

    assert ours.decode(ours.encode({"position": kept}))["position"] == kept
    assert ours.decode(library.encode({"position": kept}))["position"] == kept
    assert ours.decode(before)["position"] == Position(5, None, "feed", {17: 2}, 0, {9: -1})
