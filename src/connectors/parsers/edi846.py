"""EDI X12 846 (Inventory Inquiry/Advice): one record per LIN loop, read segment by segment.

Options (every one optional):

- `sku_qualifiers`: the LIN qualifiers whose value is the supplier SKU, first present
  wins. Default ["SK", "VP", "BP"] (seller's SKU, vendor's part, buyer's part).
- `upc_qualifiers`: the LIN qualifiers whose value is the UPC/EAN/GTIN, first present
  wins. Default ["UP", "EN"].
- `quantity_qualifiers`: the QTY01 qualifiers to report, in order of preference: the
  first one the LIN loop has is taken. Default ["33", "QA", "17"]: available for sale,
  else available, else on hand.
- `encoding`: default "utf-8".

Separators are the ones the ISA declares: the element separator is its 4th character,
the sub-element separator its 105th, the segment terminator its 106th. Where the
terminator is not CR or LF, CR and LF anywhere are not data and are dropped (mainframes
and VANs wrap lines at 80 columns, inside segments and the ISA too); where it is one, CR
and LF after it are ignored. An interchange may hold several GS groups, each several ST
sets, and a file several interchanges, one after another, each with the separators its
own ISA declares.

Each record carries the identifiers of its LIN pairs, the chosen QTY (QTY03 is the unit;
of a composite, its first part; an X12 number, `.` its decimal mark and never a
thousands separator, with an optional base 10 exponent: `100.000` and `1E2` are 100,
`2.5` a RecordError), its SCH lines as
`incoming` (SCH01 quantity, SCH02 unit, SCH06 date), and observed_at from BIA04/BIA05
(CCYYMMDD or YYMMDD, HHMM; a BIA without a time takes GS05 where GS04 is its date), else
GS04/GS05, else ISA09/ISA10, naive. `position` counts LIN loops across all sets; `raw`
holds the envelope's control numbers and the loop's segments as lists of elements.

A FeedError: no ISA or a broken one, a set other than 846, a segment out of place, a
truncated interchange, an unreadable envelope or BIA date, a segment identifier that is
not one (`lin`), a QTY or SCH before any LIN, and any count or control number that is
not ASCII digits or does not match (SE01, SE02/ST02, GE01, GE02/GS06, IEA01,
IEA02/ISA13; CTT01, where sent), or repeats (ST02 within a group, GS06 within an
interchange).
Counts are checked when the trailer arrives, after the records before it were
yielded: the caller must treat a FeedError raised at any point as the rejection of the
whole delivery. A RecordError: a LIN loop without a usable identifier, without a QTY of
a wanted qualifier or with that QTY given more than once with different values (per
location, say), or with an unreadable quantity or SCH line.
"""

from __future__ import annotations

import io
import re
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, BinaryIO, ClassVar, TextIO

from connectors.parsers.records import (
    FeedError,
    Incoming,
    Parsed,
    Record,
    RecordError,
    Unreadable,
    ValueFormat,
    bad_encoding,
    option_encoding,
    option_names,
    shown,
)

ISA_LENGTH = 106
CHUNK = 64 * 1024
LONGEST_SEGMENT = 1 << 20  # past this without a terminator, the separators must be wrong
# And as written, line breaks and all: a file of 32 MiB of blank lines after its ISA was
# read again whole at each chunk, and took 90 s (a fuzzing walkthrough).
LONGEST_WRITTEN = 2 * LONGEST_SEGMENT
LONGEST_LOOP = 10_000  # segments in one LIN loop
OUT_OF_SET = frozenset({"ISA", "IEA", "GS", "GE", "ST"})
LOOP_ENDS = frozenset({"LIN", "CTT", "SE"})
# Segments of an item, which only a LIN loop may hold.
ITEM_SEGMENTS = frozenset({"QTY", "SCH"})
# A segment identifier: two or three upper-case letters or digits, the first a letter.
SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{1,2}")
# X12 numbers (type R) always mark decimals with "." and never group thousands: "1.000" is
# one, not the ambiguity it is in a feed that does not say how it writes numbers.
NUMBERS = ValueFormat(separators_known=True)
LINE_BREAKS = "\r\n"

Segment = list[str]


@dataclass(frozen=True)
class EdiSettings:
    """The 846 options of one supplier, checked."""

    # The options `from_options` reads (connectors.config refuses any other).
    OPTIONS: ClassVar[frozenset[str]] = frozenset(
        {"encoding", "sku_qualifiers", "upc_qualifiers", "quantity_qualifiers"}
    )

    sku_qualifiers: tuple[str, ...]
    upc_qualifiers: tuple[str, ...]
    quantity_qualifiers: tuple[str, ...]
    encoding: str

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> EdiSettings:
        encoding = option_encoding(options, "utf-8")
        return cls(
            sku_qualifiers=option_names(options, "sku_qualifiers", ("SK", "VP", "BP")),
            upc_qualifiers=option_names(options, "upc_qualifiers", ("UP", "EN")),
            quantity_qualifiers=option_names(options, "quantity_qualifiers", ("33", "QA", "17")),
            encoding=encoding,
        )


@dataclass(frozen=True)
class _Context:
    """Where a LIN loop sits: control numbers, separators and the time that applies."""

    interchange: str
    sub_element: str
    group: str = ""
    transaction: str = ""
    observed_at: datetime | None = None
    # GS04/GS05, when the group was made: the time of a BIA that gives only its date.
    group_made_at: datetime | None = None


def parse_edi846(source: BinaryIO, options: Mapping[str, Any]) -> Iterator[Parsed]:
    """The records of an 846 interchange, read as the stream arrives; options checked at once."""
    return _parse(source, EdiSettings.from_options(options))


def _parse(source: BinaryIO, settings: EdiSettings) -> Iterator[Parsed]:
    text = io.TextIOWrapper(source, encoding=settings.encoding, newline="")
    try:
        yield from _interchanges(_segments(text), settings)
    except UnicodeError as error:
        raise bad_encoding(error, settings.encoding) from error
    finally:
        text.detach()  # the caller owns the source: closing the wrapper would close it


def _segments(text: TextIO) -> Iterator[Segment]:
    """Each interchange's ISA elements, then its following segments split on the separators
    that ISA declares, through its IEA; then the next interchange's, on its own (a file of
    interchanges whose ISAs declared other separators was rejected whole, read with the
    first one's)."""
    rest: str | None = ""
    first = True
    while rest is not None:
        rest = yield from _interchange_segments(text, rest, first)
        first = False


def _interchange_segments(
    text: TextIO, buffer: str, first: bool
) -> Generator[Segment, None, str | None]:
    """One interchange's segments, from what is left of the text before (`buffer`) and the
    text; returns what follows its IEA, as written, or None at the end of the file."""
    # The ISA and one character after it (the next segment's first, or a terminator
    # wrapped onto the next line).
    buffer = buffer.lstrip("\ufeff \t\r\n")
    while len(_unwrapped(buffer)) <= ISA_LENGTH and (chunk := text.read(CHUNK)):
        buffer = (buffer + chunk).lstrip("\ufeff \t\r\n")
        if len(buffer) > LONGEST_WRITTEN:
            raise FeedError("bad_envelope: no ISA and a segment after it in two MiB")
    if not first and not buffer.strip().removesuffix("\x1a").strip():
        return None  # the end of the file (a DOS end-of-file mark after the last IEA too)
    try:
        element, terminator, isa_text, buffer = _isa(buffer)
    except FeedError as error:
        if first:
            raise
        inner = error.reason.removeprefix("bad_envelope: ")
        raise FeedError(f"bad_envelope: segments after IEA ({inner})") from None
    wrapped = terminator not in LINE_BREAKS
    yield isa_text[:105].split(element)
    terminated = False
    while True:
        *complete, buffer = buffer.split(terminator)
        terminated = terminated or bool(complete)
        for index, written in enumerate(complete):
            written = written.strip()
            if wrapped and ("\n" in written or "\r" in written):
                written = _unwrapped(written)
            if written:
                segment = _segment(written.split(element))
                yield segment
                if segment[0] == "IEA":
                    after = _next_pieces(complete, index + 1, 2)
                    # Its ISA and a segment ended after it, as the ISA declares: else it is
                    # read afresh, and told as such if its segments end otherwise (a review).
                    if len(after) == 2 and _isa_like(after[0], element, terminator):
                        continue  # the next interchange's ISA, read on as the rest were
                    # Another interchange's separators may differ: it is read afresh. Only
                    # then, not at every IEA: each one made the rest of its chunk be read
                    # again, 4-10 times slower on files of many small interchanges (a review).
                    return terminator.join([*complete[index + 1 :], buffer])
        if len(buffer) > LONGEST_WRITTEN or (
            len(_unwrapped(buffer) if wrapped else buffer) > LONGEST_SEGMENT
        ):
            raise FeedError(f"bad_envelope: no {shown(terminator)} terminator in a MiB of text")
        chunk = text.read(CHUNK)
        if not chunk:
            break
        buffer += chunk
    # A DOS end-of-file mark after the last segment (Ctrl-Z, as older systems write files)
    # ends the file; it rejected the whole file as a bad segment (a walkthrough).
    buffer = (_unwrapped(buffer) if wrapped else buffer).strip().removesuffix("\x1a").strip()
    if buffer:
        if not terminated:
            # Segments ended by line breaks alone, under an ISA that declares another
            # terminator, read as one segment: "group 101 ends without GE" (a walkthrough).
            reason = f"bad_envelope: the ISA declares {shown(terminator)} as the segment"
            raise FeedError(f"{reason} terminator (ISA16), and none comes after it")
        segment = _segment(buffer.split(element))
        yield segment
    return None


def _next_pieces(pieces: list[str], start: int, count: int) -> list[str]:
    """Up to `count` pieces from `start` on that are not blank."""
    found: list[str] = []
    for at in range(start, len(pieces)):
        if pieces[at].strip():
            found.append(pieces[at])
            if len(found) == count:
                break
    return found


def _isa_like(piece: str, element: str, terminator: str) -> bool:
    """Whether a piece split off on `terminator` is a whole ISA that declares these same
    element separator and terminator."""
    written = _unwrapped(piece.strip()) if terminator not in LINE_BREAKS else piece.strip()
    isa = written + terminator
    return (
        len(isa) == ISA_LENGTH
        and isa.startswith("ISA")
        and isa[3] == element
        and _is_fixed_isa(isa)
    )


def _isa(buffer: str) -> tuple[str, str, str, str]:
    """The element separator and segment terminator an ISA at the start of `buffer`
    declares, the ISA (unwrapped where it was), and the text after it as written."""
    unwrapped = _unwrapped(buffer)
    if not unwrapped.startswith("ISA"):
        raise FeedError(f"bad_envelope: the interchange starts with {shown(buffer[:3])}, not ISA")
    if len(unwrapped) < ISA_LENGTH:
        raise FeedError(f"truncated: the ISA has {len(unwrapped)} characters, expected 106")
    # As written, unless a line break comes inside the ISA, or stands for its terminator
    # with the real one on the next line: a terminator that is a line break is one only
    # as written; either other break is a wrapped line (at column 104 or 105 one passed
    # for the ISA's last separators: a review).
    after = buffer[ISA_LENGTH - 1 :]
    following = after.lstrip(LINE_BREAKS)
    wrapped_isa = any(brk in buffer[: ISA_LENGTH - 1] for brk in LINE_BREAKS) or (
        after.startswith(tuple(LINE_BREAKS)) and bool(following) and not following[0].isalnum()
    )
    isa_text = unwrapped if wrapped_isa else buffer
    if not _is_fixed_isa(isa_text):
        reason = f"bad_envelope: the ISA is not the fixed 106 characters: {shown(buffer[:106])}"
        raise FeedError(reason)
    end = ISA_LENGTH
    if wrapped_isa:  # where the ISA's 106th character stands as written
        end = next(at for at, kept in enumerate(_kept_characters(buffer), 1) if kept == ISA_LENGTH)
    return isa_text[3], isa_text[105], isa_text[:ISA_LENGTH], buffer[end:]


def _kept_characters(text: str) -> Iterator[int]:
    """For each character of `text`, how many of those up to it are not line breaks."""
    kept = 0
    for character in text:
        kept += character not in LINE_BREAKS
        yield kept


# An X12 decimal (type R) whose point leaves no digit on one side, or none but zeros after
# it: `5.`, `.0`, `-.0`; refused as not a number where X12 writes them.
_BARE_POINT = re.compile(r"([+-]?)(\d*)\.(0*)", re.ASCII)


# An X12 decimal with a base 10 exponent appended (X12.6: `1E2` is 100, `1.5E1` 15). ASCII
# digits only (`٣E0` was read as 3, where a plain `٣` is refused), and one way to match a
# run of digits: `\d+\.?\d*` tried every split of a run without an `E`, and 60,000 zeros
# took 25 s (fuzzing walkthroughs).
_EXPONENT = re.compile(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))E([+-]?\d{1,2})", re.ASCII)
# Longer than any quantity a level holds, written any way: left as written, for the
# quantity reader to refuse (a run of thousands of digits failed the delivery with
# Python's conversion limit, not a reason).
_LONGEST_DECIMAL = 64


def _decimal(value: str) -> str:
    """A whole quantity as an X12 decimal may write it, as the quantity reader takes it."""
    if len(value) > _LONGEST_DECIMAL:
        return value
    exponent = _EXPONENT.fullmatch(value)
    if exponent is not None:
        number = Decimal(exponent.group(1)).scaleb(int(exponent.group(2)))
        # Not whole (`15E-1`): left as written, for the reader to refuse.
        return str(int(number)) if number == number.to_integral_value() else value
    match = _BARE_POINT.fullmatch(value)
    if match is None or not (match.group(2) or match.group(3)):
        return value
    return f"{match.group(1)}{match.group(2) or '0'}"


def _unwrapped(text: str) -> str:
    return text.replace("\r", "").replace("\n", "")


def _is_fixed_isa(text: str) -> bool:
    """Whether text starts with an ISA of 16 elements in 106 characters, its three
    separators different and none a letter or a digit (a sub-element separator `E` cut
    the unit off `EA`, and 5 pieces were counted as 5 cases: a fuzzing walkthrough)."""
    element, sub_element, terminator = text[3], text[104], text[105]
    return (
        len(text[:105].split(element)) == 17
        and text[103] == element
        and not any(separator.isalnum() for separator in (element, sub_element, terminator))
        and len({element, sub_element, terminator}) == 3
    )


def _segment(elements: Segment) -> Segment:
    """A segment, once its identifier is one: another (`lin` for `LIN`) was skipped as a
    segment the parser does not read, and its loop's stock with it (a fuzzing walkthrough)."""
    if SEGMENT_ID.fullmatch(elements[0]) is None:
        raise FeedError(f"bad_segment: {shown(elements[0])} is not a segment identifier")
    return elements


def _interchanges(segments: Iterator[Segment], settings: EdiSettings) -> Iterator[Parsed]:
    """Every interchange of the file, one after another (a VAN's mailbox file may hold
    several), positions counted across them, each read with its own ISA's separators."""
    isa = next(segments)
    position = 0
    while True:
        position = yield from _interchange(isa, segments, settings, position)
        following = next(segments, None)
        if following is None:
            return
        if following[0] != "ISA" or len(following) != 17:
            raise FeedError("bad_envelope: segments after IEA")
        isa = following


def _interchange(
    isa: Segment, segments: Iterator[Segment], settings: EdiSettings, position: int
) -> Generator[Parsed, None, int]:
    """One interchange's records, from its ISA through its IEA; returns the position
    reached."""
    context = _Context(
        interchange=isa[13].strip(),
        sub_element=isa[16],
        observed_at=_moment("ISA09/ISA10", "20" + isa[9].strip(), isa[10].strip()),
    )
    groups: set[str] = set()
    for segment in segments:
        if segment[0] == "GS":
            _check_unique("GS06", segment, groups, f"interchange {context.interchange}")
            position = yield from _group(segment, segments, settings, context, position)
        elif segment[0] == "IEA":
            _check_count("IEA01", segment, len(groups), "groups")
            _check_control("IEA02", segment, "ISA13", context.interchange)
            return position
        else:
            raise FeedError(f"bad_envelope: {segment[0]} outside a functional group")
    raise FeedError(f"truncated: interchange {context.interchange} ends without IEA")


def _group(
    gs: Segment, segments: Iterator[Segment], settings: EdiSettings, outer: _Context, position: int
) -> Generator[Parsed, None, int]:
    control = _element(gs, 6)
    made_at = _moment("GS04/GS05", _element(gs, 4), _element(gs, 5))
    context = replace(
        outer, group=control, observed_at=made_at or outer.observed_at, group_made_at=made_at
    )
    sets: set[str] = set()
    for segment in segments:
        if segment[0] == "ST":
            _check_unique("ST02", segment, sets, f"group {control}")
            position = yield from _transaction(segment, segments, settings, context, position)
        elif segment[0] == "GE":
            _check_count("GE01", segment, len(sets), "sets")
            _check_control("GE02", segment, "GS06", control)
            return position
        else:
            reason = f"bad_envelope: {segment[0]} outside a transaction set in group {control}"
            raise FeedError(reason)
    raise FeedError(f"truncated: group {control} ends without GE")


def _transaction(
    st: Segment, segments: Iterator[Segment], settings: EdiSettings, outer: _Context, position: int
) -> Generator[Parsed, None, int]:
    control = _element(st, 2)
    if _element(st, 1) != "846":
        raise FeedError(f"not_846: ST01 is {shown(_element(st, 1))} in set {control}")
    context = replace(outer, transaction=control)
    counted, items = 1, 0
    loop: list[Segment] = []
    for segment in segments:
        counted += 1
        tag = segment[0]
        if tag in OUT_OF_SET:
            raise FeedError(f"truncated: set {control} ends without SE (found {tag})")
        if loop and tag in LOOP_ENDS:
            position += 1
            yield _item(position, loop, settings, context)
            loop = []
        items += tag == "LIN"
        if tag == "CTT":
            # Optional; where sent, it counts the set's LIN loops (a loop lost on the way,
            # the other counts still matching, was applied without a word).
            _check_count("CTT01", segment, items, "line items")
        if tag == "SE":
            _check_count("SE01", segment, counted, "segments")
            _check_control("SE02", segment, "ST02", control)
            return position
        if tag == "BIA" and not loop:
            moment = _bia_moment(segment, outer.group_made_at)
            context = replace(context, observed_at=moment or outer.observed_at)
        if tag in ITEM_SEGMENTS and not loop:
            # Stock of no item: not a record to refuse, a set out of shape.
            raise FeedError(f"misplaced_segment: {tag} before any LIN in set {control}")
        if tag == "LIN" or loop:
            loop.append(segment)
            if len(loop) > LONGEST_LOOP:
                raise FeedError(
                    f"bad_envelope: a LIN loop of set {control} runs past {LONGEST_LOOP}"
                )
    raise FeedError(f"truncated: set {control} ends without SE")


def _item(position: int, loop: list[Segment], settings: EdiSettings, context: _Context) -> Parsed:
    raw: dict[str, Any] = {
        "interchange": context.interchange,
        "group": context.group,
        "set": context.transaction,
        "segments": loop,
    }
    lin = loop[0]
    pairs: dict[str, str] = {}
    for qualifier, value in zip(lin[2::2], lin[3::2], strict=False):
        if qualifier.strip() and value.strip():
            given = pairs.setdefault(qualifier.strip(), value.strip())
            if given != value.strip():
                # Which item is it? The first was taken and the other dropped unsaid (a
                # fuzzing walkthrough), as a QTY given twice is refused.
                reason = (
                    f"conflicting_identifiers: LIN {qualifier.strip()} given twice"
                    f" ({shown(given)}, {shown(value.strip())})"
                )
                return RecordError(position, reason, raw)
    sku = next((pairs[q] for q in settings.sku_qualifiers if q in pairs), None)
    upc = next((pairs[q] for q in settings.upc_qualifiers if q in pairs), None)
    if sku is None and upc is None:
        return RecordError(position, f"missing_identifier: LIN pairs {sorted(pairs)}", raw)
    quantities: dict[str, list[Segment]] = {}
    for segment in loop:
        if segment[0] == "QTY":
            quantities.setdefault(_element(segment, 1), []).append(segment)
    reported = next((q for q in settings.quantity_qualifiers if q in quantities), None)
    if reported is None:
        wanted, found = "/".join(settings.quantity_qualifiers), "/".join(quantities) or "none"
        return RecordError(position, f"missing_quantity: no QTY {wanted} (found {found})", raw)
    chosen, *others = quantities[reported]
    said = [(_element(q, 2), _element(q, 3)) for q in (chosen, *others)]
    if len({_meant(quantity, unit, context) for quantity, unit in said}) > 1:
        # Per location, say (an N1 or LX loop around them, which is not read): one level
        # per item is kept, and the first one taken silently dropped the rest (a walkthrough).
        written = ", ".join(" ".join(filter(None, pair)) for pair in said)
        reason = f"conflicting_quantities: QTY {reported} given {len(said)} times ({written})"
        return RecordError(position, reason, raw)
    try:
        quantity = NUMBERS.quantity(_decimal(_element(chosen, 2)))
        if quantity is None:
            raise Unreadable("missing_quantity: QTY02 is empty")
        incoming = tuple(_incoming(s, context) for s in loop if s[0] == "SCH")
    except Unreadable as unreadable:
        return RecordError(position, str(unreadable), raw)
    unit = _element(chosen, 3).split(context.sub_element)[0].strip() or None
    return Record(position, sku, upc, quantity, unit, context.observed_at, raw, incoming)


def _meant(quantity: str, unit: str, context: _Context) -> tuple[object, str]:
    """A QTY's quantity and unit as compared with the item's others: `5` and `5.0`, `ea`
    and `EA`, are one (they were refused as `conflicting_quantities`: a walkthrough)."""
    try:
        amount: object = Decimal(_decimal(quantity.strip()))
    except InvalidOperation:
        amount = quantity
    if isinstance(amount, Decimal) and not amount.is_finite():
        amount = quantity  # a signalling NaN cannot be hashed: `sNaN` failed the file
    return amount, unit.split(context.sub_element)[0].strip().upper()


def _incoming(sch: Segment, context: _Context) -> Incoming:
    try:
        quantity = NUMBERS.quantity(_decimal(_element(sch, 1)))
    except Unreadable:
        quantity = None
    if quantity is None:
        raise Unreadable(f"invalid_incoming: SCH01 {shown(_element(sch, 1))}")
    written = _element(sch, 6)
    try:
        # strptime takes "2026115" (seven digits) as 5 November.
        if written and not (len(written) == 8 and _digits(written)):
            raise ValueError(written)
        expected_on = datetime.strptime(written, "%Y%m%d").date() if written else None
    except ValueError:
        raise Unreadable(f"invalid_incoming: SCH06 {shown(written)}") from None
    unit = _element(sch, 2).split(context.sub_element)[0].strip() or None
    return Incoming(quantity, expected_on, unit)


def _bia_moment(bia: Segment, group_made_at: datetime | None) -> datetime | None:
    """BIA04/BIA05; a BIA of a date alone takes the time of a group made that day (it
    was read as of midnight, hours older than it was)."""
    moment = _moment("BIA04/BIA05", _element(bia, 4), _element(bia, 5))
    if moment and not _element(bia, 5) and group_made_at and group_made_at.date() == moment.date():
        return group_made_at
    return moment


def _moment(where: str, day: str, time: str) -> datetime | None:
    """A naive date-time from CCYYMMDD (or YYMMDD, as releases before 004010 write GS04
    and BIA04, and the ISA does: this century) and HHMM[SS[D..]]; None when the date is
    absent."""
    if not day:
        return None
    century = "20" if len(day) == 6 else ""
    written = century + day + (time[:6] or "0000").ljust(6, "0")
    try:
        if len(day) not in (6, 8) or len(time) not in (0, 4, 6, 7, 8) or not _digits(written):
            raise ValueError(written)
        return datetime.strptime(written, "%Y%m%d%H%M%S")
    except ValueError:
        reason = f"bad_date: {where} {shown(day)} {shown(time)} is not CCYYMMDD HHMM"
        raise FeedError(reason) from None


def _element(segment: Segment, index: int) -> str:
    return segment[index].strip() if index < len(segment) else ""


def _check_count(where: str, segment: Segment, counted: int, what: str) -> None:
    said = _element(segment, 1)
    if _number(said) != counted:
        reason = f"bad_envelope: {where} says {said or 'nothing'} {what}, counted {counted}"
        raise FeedError(reason)


def _check_control(where: str, segment: Segment, header: str, control: str) -> None:
    said = _element(segment, 2)
    number = _number(said)
    same = said == control or (number is not None and number == _number(control))
    if not same:
        reason = f"bad_envelope: {where} {shown(said)} does not match {header} {shown(control)}"
        raise FeedError(reason)


def _check_unique(where: str, segment: Segment, seen: set[str], within: str) -> None:
    """A set's or a group's control number, noted as seen once it is new where it stands:
    X12 numbers them uniquely there, and two sets under one number were both read."""
    said = _element(segment, 6 if where == "GS06" else 2)
    # GS06 is a number (`0101` is 101); ST02 is alphanumeric, so `0001` and `1` are two
    # sets (a walkthrough).
    number = _number(said) if where == "GS06" else None
    key = said if number is None else str(number)
    if key in seen:
        raise FeedError(f"bad_envelope: {where} {shown(said)} repeats in {within}")
    seen.add(key)


def _number(text: str) -> int | None:
    """A count or control number, None unless ASCII digits only, and at most 18 of them
    (an SE01 of 5,000 digits failed the delivery with Python's conversion limit)."""
    return int(text) if _digits(text) and len(text) <= 18 else None


def _digits(text: str) -> bool:
    # str.isdigit() takes "²", which int() refuses, and int() takes Arabic-Indic digits.
    return text.isascii() and text.isdigit()
