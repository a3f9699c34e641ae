"""Lone UTF-16 surrogates in what suppliers and clients write (JSON's "\\ud800" escape reads
as one; a supplier's `encoding` such as UTF-7 may decode to one): UTF-8 cannot encode them,
so the text holding one is refused, and a refused record is kept with U+FFFD in its place."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from connectors.config import check_connector
from connectors.normalise import FeedRules, normalise
from connectors.parsers import Incoming, Record, RecordError, parse
from connectors.parsers import json_feed as json_parser
from ledger.application import InventoryLedger
from ledger.base import Cause
from ledger.delivery import DeliveryOutcome, FeedDelivery, Rejection, kept, kept_cheaply
from ledger.supplier import SupplierTerms

AT = datetime(2026, 3, 1, 12, tzinfo=UTC)


def test_a_lone_surrogate_becomes_u_fffd_in_text_and_in_names_and_a_pair_is_left_alone() -> None:
    record = {"s\ud800ku": "A\udc00", "more": [{"u": "\udfff\x00"}], "pair": "\U0001f600"}

    assert kept(record) == {
        "s\ufffdku": "A\ufffd",
        "more": [{"u": "\ufffd\ufffd"}],
        "pair": "\U0001f600",
    }
    json.dumps(kept(record), ensure_ascii=False).encode()  # UTF-8 encodes it now


@pytest.mark.parametrize(
    "record",
    [{"sku": "A\ud800"}, {"s\udc00ku": "A"}, {"fields": {"unit": "C\ud800S"}, "raw": {}}],
    ids=["in-a-value", "in-a-name", "nested"],
)
def test_a_record_holding_a_lone_surrogate_is_not_kept_as_it_is(record: dict[str, Any]) -> None:
    copy = kept_cheaply(record)

    assert copy is not record
    assert copy == kept(record)
    json.dumps(copy, ensure_ascii=False).encode()


def test_a_delivery_s_event_keeps_its_refused_records_as_a_refusal_keeps_them() -> None:
    """A feed's first refusals reach the event as they were read: encoding it failed."""
    app = InventoryLedger({"PERSISTENCE_MODULE": "eventsourcing.popo"}, allow_in_memory=True)
    record = {"fields": None, "raw": {"sku": "A\ud800", "n\udc00": "x"}}
    outcome = DeliveryOutcome("d-1", 1, 0, 0, 0, [Rejection(1, "lone_surrogate", record)])

    delivery = FeedDelivery.record("acme", "hash", "upload", outcome, AT, Cause("a", "r", "c"))

    [event] = delivery.collect_events()
    stored = app.mapper.to_stored_event(event)  # raised UnicodeEncodeError
    assert "A\ufffd" in stored.state.decode()
    assert event.rejected[0]["record"] == {
        "fields": None,
        "raw": {"sku": "A\ufffd", "n\ufffd": "x"},
    }


def feed_record(**fields: Any) -> Record:
    written: dict[str, Any] = {"supplier_sku": "A", "upc": None, "unit": None, **fields}
    return Record(
        position=1,
        supplier_sku=written["supplier_sku"],
        upc=written["upc"],
        quantity=3,
        unit=written["unit"],
        observed_at=AT,
        raw={},
        incoming=written.get("incoming"),
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"supplier_sku": "A\ud800"},
        {"supplier_sku": None, "upc": "0\udc0012345678"},
        {"unit": "C\udfffS"},
        {"incoming": (Incoming(2, None, "C\ud800"),)},
    ],
    ids=["supplier-sku", "upc", "unit", "incoming-unit"],
)
def test_a_feed_record_whose_text_holds_a_lone_surrogate_is_refused_as_such(
    fields: dict[str, Any],
) -> None:
    rules = FeedRules.of(SupplierTerms(name="acme"))

    assert normalise(feed_record(**fields), rules, AT, AT) == "lone_surrogate"
    assert normalise(feed_record(supplier_sku="A\U0001f600"), rules, AT, AT) != "lone_surrogate"


def test_a_json_feed_reads_a_lone_surrogate_escape_as_it_instead_of_failing_the_feed() -> None:
    records = [
        {"sku": "A\ud800", "quantity": 1},
        {"sku": "B", "quantity": "\udc00", "n\udfff": 1},
        {"sku": "C\ud83d\ude00", "quantity": 2, "path": "\\ud800"},
    ]
    body = json.dumps(records).encode()  # the surrogates as \u escapes

    first, second, third = parse("json", io.BytesIO(body))

    assert isinstance(first, Record)
    assert first.supplier_sku == "A\ud800"
    assert isinstance(second, RecordError)
    assert second.reason == "invalid_quantity: '\\udc00'"
    assert second.raw == {"sku": "B", "quantity": "\udc00", "n\udfff": 1}
    assert isinstance(third, Record)
    assert (third.supplier_sku, third.raw["path"]) == ("C\U0001f600", "\\ud800")


@pytest.mark.parametrize("chunk", range(1, 30))
def test_a_lone_surrogate_escape_reads_alike_wherever_the_stream_cuts_it(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """An escape, or a pair, cut by the end of a chunk is read whole; so is an escaped
    backslash before a "u", which is no escape."""
    monkeypatch.setattr(json_parser, "CHUNK", chunk)
    records = [{"sku": f"{text}-{n}", "quantity": 1} for n in range(3) for text in TEXTS]
    body = json.dumps(records).encode()

    skus = [item.supplier_sku for item in parse("json", io.BytesIO(body))]  # type: ignore[union-attr]

    assert skus == [record["sku"] for record in records]


TEXTS = ["A\ud800", "\udc00B", "\\\\ud800", "\\\ud800", "\U0001f600\ud800\U0001f600", "plain"]


def test_connector_settings_holding_a_lone_surrogate_are_refused() -> None:
    for connector in (
        {"units": {"\udc00": 2}},
        {"options": {"delimiter": "\ud800"}},
        {"webhook": {"secret_ref": "file:/run/\ud800"}},
    ):
        with pytest.raises(ValueError, match="lone UTF-16 surrogate"):
            check_connector(connector)
