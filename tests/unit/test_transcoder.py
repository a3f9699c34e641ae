"""The event store's transcoder reads exactly what the library's would, only faster."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from eventsourcing.persistence import JSONTranscoder, TranscodingNotRegisteredError
from hypothesis import given
from hypothesis import strategies as st

from ledger.application import InventoryLedger, LedgerTranscoder
from ledger.reservation import Line
from ledger.stock import Position


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
)
plain = (
    st.none()
    | st.booleans()
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
