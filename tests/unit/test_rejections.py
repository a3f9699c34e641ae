"""A delivery's refusals: all kept (spooled, not as objects), the first by position at hand."""

from __future__ import annotations

import pytest

from connectors import outcome
from connectors.outcome import Rejections
from ledger.delivery import Rejection, kept


def refusal(index: int) -> Rejection:
    fields = {"supplier_sku": f"S-{index}", "quantity": index, "unit": None}
    return Rejection(index, f"reason-{index % 3}", {"fields": fields, "raw": fields})


def test_every_refusal_reads_back_as_it_was_refused_past_memory_and_past_a_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outcome, "SPOOL_BYTES", 4096)  # to a file after a few dozen
    refused = Rejections(first_kept=10)
    indexes = [(n * 7919) % 2500 for n in range(2500)]  # every index once, out of order
    refused.extend(refusal(index) for index in indexes)

    read = list(refused)

    assert refused._spool._rolled  # type: ignore[attr-defined]
    assert len(refused) == 2500
    assert read == [refusal(index) for index in indexes]
    # Each keeps its own record, the same object as written and as raw, page after page.
    assert all(r.record is not None and r.record["raw"] is r.record["fields"] for r in read)
    assert len({id(r.record["fields"]) for r in read if r.record}) == 2500


def test_the_first_by_position_are_at_hand_whatever_the_order_refused() -> None:
    refused = Rejections(first_kept=3)
    for index in (9, 4, 7, 1, 8, 4, 2):
        refused.append(Rejection(index, f"r{index}-{len(refused)}"))

    assert [(r.index, r.reason) for r in refused.first(3)] == [
        (1, "r1-3"),
        (2, "r2-6"),
        (4, "r4-1"),  # the first refused of two at one position
    ]
    assert [r.index for r in refused.first(2)] == [1, 2]
    with pytest.raises(ValueError, match="only the first 3"):
        refused.first(4)


def test_refusals_added_while_others_are_read_are_read_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(outcome, "READ_PAGE", 2)  # appended between pages, and within one
    refused = Rejections()
    refused.extend(refusal(index) for index in range(3))
    seen = []
    for rejection in refused:
        seen.append(rejection.index)
        if rejection.index < 2:
            refused.append(refusal(rejection.index + 10))

    assert seen == [0, 1, 2, 10, 11]


def test_a_refusal_nested_too_deeply_to_pickle_is_kept_as_a_letter_keeps_it() -> None:
    deep: dict[str, object] = {}
    inner = deep
    for _ in range(2000):  # deeper than pickle goes
        inner["x"] = {}
        inner = inner["x"]  # type: ignore[assignment]
    refused = Rejections(first_kept=0)
    refused.append(Rejection(1, "invalid_record", {"fields": None, "raw": deep}))
    refused.append(Rejection(2, "invalid_record"))

    [first, second] = list(refused)

    assert first.record == kept({"fields": None, "raw": deep})
    assert (second.index, second.record) == (2, None)
    assert refused.first(0) == []
