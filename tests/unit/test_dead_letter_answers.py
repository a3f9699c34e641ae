"""A dead-letter retry's answer, whatever order its letters were applied in."""

from __future__ import annotations

import json

from api.routers.deadletters import _out
from connectors.deadletters import RetryOutcome, letter_json


def test_a_retry_answers_its_letters_in_id_order_though_applied_supplier_by_supplier() -> None:
    # Applied supplier by supplier: the first supplier's letters 1, 3 and 8, then the
    # second's 2 and 5.
    outcome = RetryOutcome()
    outcome.resolved += [1, 8, 2]
    outcome.still_refused.update({3: "unknown_sku", 5: "negative_quantity"})
    outcome.still_refused[4] = "unknown_sku"
    outcome.not_retryable += [9, 6]
    outcome.being_retried += [7]
    outcome.applied, outcome.late = 2, 1
    outcome.position = 42

    assert _out(outcome) == {
        "resolved": [1, 2, 8],
        "still_refused": [
            {"id": 3, "reason": "unknown_sku"},
            {"id": 4, "reason": "unknown_sku"},
            {"id": 5, "reason": "negative_quantity"},
        ],
        "not_retryable": [6, 9],
        "being_retried": [7],
        "applied": 2,
        "unchanged": 0,
        "late": 1,
        "position": 42,
    }


def test_a_letter_holds_no_nul_and_no_number_json_cannot_hold() -> None:
    """PostgreSQL's JSON takes neither `\\u0000` nor `NaN`: such a letter failed its whole
    delivery's letters (a fuzzing walkthrough; a review, for the NUL)."""
    written = letter_json(
        {"supplier_sku": "A\x00", "quantity": float("inf"), "k\x00": [float("nan")]}
    )

    assert json.loads(written) == {
        "supplier_sku": "A\ufffd",
        "quantity": "Infinity",
        "k\ufffd": ["NaN"],
    }
    assert "\\u0000" not in written
    assert (
        letter_json({"supplier_sku": "A", "quantity": 3}) == '{"supplier_sku": "A", "quantity": 3}'
    )
