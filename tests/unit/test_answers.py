"""The hottest answers, written directly (api.answers), are the bytes their models write."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from api.answers import availability_fields, reservation_fields, written
from api.routers.availability import availability_answer, availability_out
from api.routers.reservations import reservation_out
from api.schemas import AvailabilityBatchOut
from ledger.base import Cause
from ledger.reservation import Reservation
from ledger.stock import Allocation, StockLevels, SupplierLevel

T0 = datetime(2026, 3, 1, 12, 0, 5, 120_300, tzinfo=UTC)
CAUSE = Cause("oms", "test", "req-1")
# What a JSON writer might write its own way: escapes, other scripts, line separators.
AWKWARD = 'Ü-\u2028-"-\\-\n-\t-\x01-\x7f-😀'


def reservation(order_id: str, lines: list[tuple[str, int, list[Allocation]]]) -> Reservation:
    return Reservation.place(
        "oms", f"key-{order_id}", order_id, "f", lines, T0 + timedelta(minutes=15), T0, CAUSE
    )


def reservations() -> list[Reservation]:
    plain = reservation("o-1", [("SKU-1", 2, [Allocation("s1", 2)])])
    awkward = reservation(
        AWKWARD,
        [
            (AWKWARD, 5, [Allocation("s1", 3), Allocation(AWKWARD, 2)]),
            ("SKU-2", 1, [Allocation("s2", 1)]),
        ],
    )
    awkward.confirm(T0.replace(microsecond=0) + timedelta(seconds=1), CAUSE, [])
    awkward.fulfil([(AWKWARD, 4, None)], T0 + timedelta(seconds=2), CAUSE)
    awkward.return_units([(AWKWARD, 1, None)], True, T0 + timedelta(seconds=3), CAUSE)
    return [plain, awkward]


@pytest.mark.parametrize("at", [T0, T0 + timedelta(hours=1)])  # held, then expired
def test_a_reservation_is_written_as_its_model_writes_it(at: datetime) -> None:
    for placed in reservations():
        fields = reservation_fields(placed, at)
        assert written(fields, lambda: pytest.fail("orjson refused")) == (
            reservation_out(placed, at).model_dump_json().encode()
        )


def levels(sku: str, *suppliers: SupplierLevel, available: int = 7) -> StockLevels:
    return StockLevels(sku, 10, 9, 1, 1, available, 1, list(suppliers))


WEST = timezone(timedelta(hours=-3))
SUPPLIERS = [
    SupplierLevel("s1", 5, T0, 30, False, False, 5, 1, 0, 2),
    # Naive and other-zone times, no time at all, a stale level
    SupplierLevel(AWKWARD, 5, datetime(2026, 3, 1, 12), None, True, False, 4, 0, 1, 5),
    SupplierLevel("s3", 0, T0.astimezone(WEST), 9, False, True, 0, 0, 0, 0),
    SupplierLevel("s4", 0, None, None, False, True, 0, 0, 0, 3),
]


@pytest.mark.parametrize(
    "found",
    [
        [levels("SKU-1", *SUPPLIERS)],
        [levels(AWKWARD, SUPPLIERS[0], available=0)],
        [levels("SKU-2")],
    ],
)
def test_availability_is_written_as_its_models_write_it(found: list[StockLevels]) -> None:
    expected = availability_out(found[0], 5, 42).model_dump_json().encode()
    assert availability_answer(found, 5, 42, batch=False).body == expected
    batch = AvailabilityBatchOut(
        items=[availability_out(one, 5, 42) for one in found], unknown=["NOPE", AWKWARD]
    )
    answer = availability_answer(found, 5, 42, batch=True, unknown=["NOPE", AWKWARD])
    assert answer.body == batch.model_dump_json().encode()
    assert answer.headers["X-Ledger-Position"] == "42"


def test_a_value_orjson_refuses_is_written_through_the_model() -> None:
    huge = StockLevels("SKU-1", 2**70, 0, 0, 0, 0, 0, [])
    expected = availability_out(huge, 5, 1).model_dump_json().encode()
    assert availability_answer([huge], 5, 1, batch=False).body == expected
    assert b"1180591620717411303424" in expected
    with pytest.raises(TypeError):
        orjson.dumps(availability_fields(huge, 5, 1))
