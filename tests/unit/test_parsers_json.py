"""The JSON feed parser, on fixture files of several shapes and on broken ones."""

from __future__ import annotations

import gc
import io
import json
import subprocess
import sys
import tracemalloc
import weakref
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.parsers import FeedError, Parsed, Record, RecordError, parse, source_from_chunks
from connectors.parsers.json_feed import _bounded_digit_runs

FEEDS = Path(__file__).resolve().parents[1] / "fixtures" / "feeds"


def read(name: str, **options: Any) -> list[Parsed]:
    with (FEEDS / name).open("rb") as source:
        return list(parse("json", source, options))


def read_value(document: object, **options: Any) -> list[Parsed]:
    return list(parse("json", io.BytesIO(json.dumps(document).encode()), options))


def read_until_rejected(name: str) -> tuple[list[Parsed], FeedError]:
    """What a feed yields before its FeedError, and the error."""
    parsed: list[Parsed] = []
    with (FEEDS / name).open("rb") as source, pytest.raises(FeedError) as raised:
        parsed.extend(parse("json", source))
    return parsed, raised.value


def test_nested_paths_from_the_options_find_each_field() -> None:
    parsed = read(
        "json-nested-paths.json",
        records="data.products",
        fields={
            "supplier_sku": "product.code",
            "upc": "product.gtin",
            "quantity": "stock.available",
            "unit": "stock.unit",
        },
        thousands_separator=",",
    )

    good = [p for p in parsed if isinstance(p, Record)]
    assert [(p.position, p.supplier_sku, p.upc, p.quantity, p.unit) for p in good] == [
        (1, "P-1", "00012345678905", 5, "EA"),
        (2, "P-2", None, 1500, "CS"),
    ]
    assert [p.observed_at for p in good] == [
        datetime(2026, 1, 15, 14, 30, tzinfo=UTC),
        datetime(2026, 1, 15, 14, 31),
    ]
    assert parsed[2:] == [
        RecordError(3, "missing_quantity", {"product": {"code": "P-3"}, "stock": {"reserved": 2}})
    ]


def test_the_records_array_and_fields_are_found_by_their_common_names() -> None:
    parsed = read("json-default-names.json")

    good = [
        (p.position, p.supplier_sku, p.upc, p.quantity, p.unit, p.observed_at)
        for p in parsed
        if isinstance(p, Record)
    ]
    bad = [(p.position, p.reason, p.raw) for p in parsed if isinstance(p, RecordError)]
    assert good == [
        (1, "D-1", None, 7, "EA", datetime(2026, 1, 15, 14, 30, tzinfo=UTC)),
        (2, "D-2", "4006381333931", 3, None, None),
        (3, "D-3", None, 12, None, None),
    ]
    assert bad == [
        (4, "invalid_quantity: 12.5", {"sku": "D-4", "qty": 12.5}),
        (5, "not_an_object: str", {"value": "D-5"}),
        (6, "invalid_quantity: True", {"sku": "D-6", "qty": True}),
    ]


def test_a_top_level_array_after_a_byte_order_mark_is_read() -> None:
    parsed = read("json-top-level-array-bom.json")

    assert [(p.supplier_sku, p.quantity) for p in parsed if isinstance(p, Record)] == [
        ("T-1", 1),
        ("T-2", 2),
    ]


@pytest.mark.parametrize(
    "document",
    [
        {"data": {"items": [{"sku": "A", "qty": 1}]}},
        {"meta": {"records": [{"sku": "X", "qty": 9}]}, "records": [{"sku": "A", "qty": 1}]},
        {"count": 1, "inventory": [{"sku": "A", "qty": 1}], "items": [{"sku": "B", "qty": 2}]},
        # A webhook's body, uploaded as a file.
        {"delivery_id": "d-1", "observations": [{"sku": "A", "qty": 1}]},
    ],
)
def test_the_first_array_under_a_records_key_is_the_records(document: object) -> None:
    assert read_value(document) == [Record(1, "A", None, 1, None, None, {"sku": "A", "qty": 1})]


def test_paths_may_index_lists_and_a_field_falls_back_to_its_next_path() -> None:
    document = [{"codes": [{"value": "C-1"}], "stock": None, "qty": "4"}]

    [record] = read_value(
        document, fields={"supplier_sku": "codes.0.value", "quantity": ["stock", "qty"]}
    )

    assert isinstance(record, Record)
    assert (record.supplier_sku, record.quantity) == ("C-1", 4)


def test_an_empty_records_array_is_an_empty_delivery() -> None:
    assert read_value({"items": []}) == []


def test_malformed_json_rejects_the_feed_after_the_records_before_the_break() -> None:
    parsed, error = read_until_rejected("json-malformed.json")

    assert [p.supplier_sku for p in parsed if isinstance(p, Record)] == ["M-1", "M-2"]
    assert error.reason.startswith("malformed_json: ")


def test_trailing_garbage_after_the_records_rejects_the_feed() -> None:
    with pytest.raises(FeedError, match=r"^malformed_json"):
        list(parse("json", io.BytesIO(b'[{"sku": "A", "qty": 1}] {"sku": "B"}')))


def test_a_document_without_a_records_array_is_rejected() -> None:
    _, error = read_until_rejected("json-no-records.json")

    assert error.reason.startswith("no_records: no array at the top level or under items")


def test_a_records_path_that_is_not_an_array_is_rejected() -> None:
    with pytest.raises(FeedError, match=r"^no_records: 'data' is not an array"):
        read_value({"data": {"sku": "A", "qty": 1}}, records="data")
    with pytest.raises(FeedError, match=r"^no_records: no array at 'stock.rows'"):
        read_value({"items": [{"sku": "A", "qty": 1}]}, records="stock.rows")


@pytest.mark.parametrize(
    "options",
    [{"records": ["data"]}, {"fields": {"qty": "stock"}}, {"fields": "stock.available"}],
)
def test_bad_options_are_refused_before_anything_is_read(options: dict[str, Any]) -> None:
    source = io.BytesIO(b"[]")

    with pytest.raises(ValueError, match=r"^bad_option"):
        parse("json", source, options)
    assert source.tell() == 0


RECORDS = 50_000  # 2.3 MB: some 35 reads of 64 KB


def generated_document() -> Iterator[bytes]:
    yield b'{"meta": {"supplier": "acme"}, "data": {"items": ['
    for start in range(0, RECORDS, 1000):
        rows = (
            f'{{"sku": "SKU-{n}", "stock": {{"available": {n % 500}}}}}'
            for n in range(start, start + 1000)
        )
        yield (b"," if start else b"") + ",".join(rows).encode()
    yield b"]}}"


def test_a_large_feed_is_parsed_while_it_is_still_being_read() -> None:
    source = source_from_chunks(generated_document())
    read_at: dict[int, int] = {}
    count = 0

    for count, item in enumerate(parse("json", source), start=1):
        assert isinstance(item, Record)
        assert (item.position, item.quantity) == (count, (count - 1) % 500)
        if count == 1:
            first = weakref.ref(item)
        if count in (1, RECORDS // 2):
            read_at[count] = source.tell()
    del item
    gc.collect()

    total = source.tell()
    assert count == RECORDS
    assert read_at[1] < total / 20
    assert read_at[RECORDS // 2] < total * 0.6
    assert first() is None, "the parser keeps the records it yielded"


def test_a_document_nested_deeper_than_any_feed_is_refused_cheaply() -> None:
    body = b'{"items": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}"
    tracemalloc.start()
    try:
        with pytest.raises(FeedError, match="too_deeply_nested"):
            list(parse("json", io.BytesIO(body), {}))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 1_048_576


def test_an_integer_past_64_bits_is_read_as_written_and_fractions_as_floats() -> None:
    # The C parser refuses such an integer, and with it the file, where floats are asked
    # for: here the record carries it, for the pipeline to refuse that record alone.
    at = "2026-01-01T00:00:00Z"
    parsed = read_value(
        [
            {"supplier_sku": "HUGE", "quantity": 10**22, "observed_at": at},
            {"supplier_sku": "WHOLE", "quantity": 12.0, "observed_at": at},
            {"supplier_sku": "HALF", "quantity": 12.5, "observed_at": at},
        ]
    )

    huge, whole, half = parsed
    assert isinstance(huge, Record)
    assert huge.quantity == 10**22
    assert isinstance(whole, Record)
    assert whole.quantity == 12
    assert isinstance(half, RecordError)
    assert half.reason.startswith("invalid_quantity")


@pytest.mark.parametrize(
    ("number", "reason"),
    [
        (b"1e400", "invalid_quantity: '1E+400'"),  # infinite as a float
        (b"-1e400", "invalid_quantity: '-1E+400'"),
        (b"1e-400", "invalid_quantity: '1E-400'"),  # zero as a float: it was applied as 0
        (b"1e30", "invalid_quantity: '1E+30'"),
    ],
)
def test_a_number_no_float_holds_is_refused_with_the_record_as_written(
    number: bytes, reason: str
) -> None:
    """Found by a fuzzing walkthrough: `1e400` made a letter PostgreSQL refused (its raw
    record held an infinite float), which wedged every later delivery; `1e-400` set the
    level to 0."""
    body = b'[{"supplier_sku": "A1", "quantity": ' + number + b'}, {"sku": "B2", "quantity": 1e3}]'

    refused, kept = parse("json", io.BytesIO(body))

    assert isinstance(refused, RecordError)
    assert refused.reason == reason
    assert json.dumps(refused.raw, allow_nan=False)  # a letter PostgreSQL takes
    assert isinstance(kept, Record)
    assert kept.quantity == 1000


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'[{"supplier_sku": "A\xed\xa0\x801", "quantity": 5}]', "can't decode byte 0xed"),
        (b'[{"supplier_sku": "A1", "quantity": ' + b"9" * 5000 + b"}]", "more than 4,300 digits"),
        # A walkthrough: ijson raised decimal.InvalidOperation, and the delivery failed.
        (b'[{"supplier_sku": "A1", "quantity": 1E+9999999999999999999}]', "an exponent of"),
        (b'[{"supplier_sku": "A1", "quantity": 1E-99999999999999999999}]', "an exponent of"),
    ],
    ids=["encoded-surrogate", "5000-digits", "exponent-too-large", "exponent-too-small"],
)
def test_a_file_python_cannot_read_is_rejected_whole_as_malformed(body: bytes, says: str) -> None:
    """Found by a fuzzing walkthrough: each failed its delivery eight times over, then
    left it failed, where a file that cannot be read is rejected with its reason."""
    with pytest.raises(FeedError, match=r"^malformed_json: .*" + says):
        list(parse("json", io.BytesIO(body)))


@pytest.mark.parametrize(
    "body",
    [
        "b'[{\"supplier_sku\": \"A1\", \"quantity\": 1' + b'0' * 70_000 + b'}]'",
        "b'[' + b'9' * 4_301 + b' x'",
        "b'9' * 4_301",
    ],
    ids=["70,000-digits", "4,301-before-a-fault", "4,301-at-the-end"],
)
def test_an_integer_of_more_digits_than_the_c_parser_survives_is_refused_not_a_crash(
    body: str,
) -> None:
    """A security walkthrough: an integer of 65,534 digits or more crashed the process in
    ijson's C parser (a segfault), and `ledger serve` again at each restart; a fuzzing one,
    an integer of 4,301 digits that ends the document or comes before a syntax error. Run
    in a process of its own, so that a crash fails this test, not the suite."""
    program = (
        "import io, sys\n"
        "from connectors.parsers import FeedError, parse\n"
        f"body = {body}\n"
        "try:\n"
        "    list(parse('json', io.BytesIO(body)))\n"
        "except FeedError as error:\n"
        "    print(error.reason)\n"
    )
    ran = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)

    assert ran.returncode == 0, (ran.returncode, ran.stderr)
    assert ran.stdout.startswith("malformed_json: more than 4,300 digits in a row"), ran.stdout


@pytest.mark.parametrize(
    ("chunks", "refused"),
    [
        ([b"1" * 4_300], False),
        ([b"1" * 4_301], True),
        ([b'"' + b"1" * 2_000, b"1" * 2_300 + b'"'], False),
        ([b'"' + b"1" * 2_000, b"1" * 2_301 + b'"'], True),
        ([b"x" + b"1" * 1_500, b"1" * 1_500, b"1" * 1_301 + b"x"], True),
        ([b"1" * 4_000 + b",", b"1" * 4_000], False),
        ([b"[" + b"12345," * 20_000 + b"1]"], False),
    ],
    ids=[
        "at-the-bound",
        "past-it",
        "across-two",
        "past-across-two",
        "across-three",
        "two-runs",
        "many-numbers",
    ],
)
def test_digits_in_a_row_are_counted_across_chunks(chunks: list[bytes], refused: bool) -> None:
    bounded = _bounded_digit_runs(iter(chunks))
    if refused:
        with pytest.raises(FeedError, match="digits in a row"):
            list(bounded)
    else:
        assert list(bounded) == chunks


def test_digits_in_a_string_below_the_bound_are_read_as_any_text() -> None:
    body = b'[{"supplier_sku": "' + b"7" * 4_000 + b'", "quantity": 5}, {"sku": "B", "qty": 2}]'

    parsed = list(parse("json", io.BytesIO(body)))

    assert len(parsed) == 2


@pytest.mark.parametrize("written", ["4.9999999999999999999", "0.99999999999999999999"])
def test_a_fraction_a_float_rounds_away_is_no_whole_quantity(written: str) -> None:
    """`4.9999999999999999999` was applied as 5, `0.99999999999999999999` as 1 (a fuzzing
    walkthrough): the fraction is refused, as `4.5` is."""
    body = f'[{{"supplier_sku": "A1", "quantity": {written}}}, {{"sku": "B", "qty": 4.0}}]'
    refused, kept = parse("json", io.BytesIO(body.encode()))

    assert isinstance(refused, RecordError)
    assert refused.reason == f"invalid_quantity: {written}"
    assert isinstance(kept, Record)
    assert kept.quantity == 4


def test_a_time_of_a_fraction_a_float_rounds_away_is_still_a_time() -> None:
    """Refused as no time once such numbers were kept as written (a review)."""
    body = b'[{"supplier_sku": "A1", "quantity": 3, "observed_at": 1733616000.000000001}]'
    [record] = parse("json", io.BytesIO(body))

    assert isinstance(record, Record)
    assert record.observed_at == datetime(2024, 12, 8, 0, 0, tzinfo=UTC)
