"""XML stock feeds: record elements read as a stream, with entity expansion refused.

Options (every one optional):

- `record`: the local name of the record element, in any namespace. By default, the
  first element named item, product, stock or record below the root that looks like a
  record (it has child elements, or an identifier or quantity attribute); from then on
  every element of that name that is not inside another record is one.
- `fields`: our field -> a path in the record, or a list of paths tried in order:
  a child element (`Qty`), a nested one (`Stock/Available`), an attribute (`@sku`) or a
  child's attribute (`Qty/@uom`); a plain name that matches no child element reads the
  attribute of that name. Fields are supplier_sku, upc, quantity, unit, observed_at,
  incoming_quantity, expected_on (see CSV); the
  ones not given use the common names (as for CSV) and nested ones such as
  stock/available. Names are local (namespaces do not matter) and compare loosely.
- `thousands_separator`, `decimal_separator`, `timestamp_format`: as for CSV.

Parsing goes through defusedxml: an entity declaration (billion laughs) or an external
entity is a FeedError ("forbidden_xml: ..."), so is malformed XML ("malformed_xml: ..."),
and a document whose root has children but none of them is a record ("no_records").
Records read before a break in the document have been yielded by then: the caller must
treat a FeedError raised at any point as the rejection of the whole delivery.
A RecordError: no identifier, a missing or non-whole quantity, an unreadable observed_at.
`position` counts record elements; a record's `raw` holds its attributes (as "@name"),
its children by local name (lists when repeated) and its text (as "#text").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO, ClassVar
from xml.etree.ElementTree import Element

from defusedxml import DefusedXmlException, EntitiesForbidden, ExternalReferenceForbidden
from defusedxml.ElementTree import ParseError, iterparse

from connectors.parsers.records import (
    FeedError,
    FieldPath,
    Parsed,
    RecordError,
    ValueFormat,
    field_paths,
    make_record,
    normalise_name,
    option_text,
)

RECORD_NAMES = frozenset({"item", "product", "stock", "record"})
IDENTIFIERS = ("supplier_sku", "upc")
MAX_UNDECIDED = 1000


@dataclass(frozen=True)
class XmlSettings:
    """The XML options of one supplier, checked; names normalised."""

    # The options `from_options` reads (connectors.config refuses any other).
    OPTIONS: ClassVar[frozenset[str]] = frozenset({"record", "fields"})

    record: str | None
    paths: dict[str, tuple[FieldPath, ...]]
    value_format: ValueFormat

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> XmlSettings:
        record = option_text(options, "record", None)
        paths = {
            field: tuple(tuple(_loose(segment) for segment in path) for path in candidates)
            for field, candidates in field_paths(options, "fields", "/").items()
        }
        return cls(
            record=normalise_name(record) if record else None,
            paths=paths,
            value_format=ValueFormat.from_options(options),
        )


def parse_xml(source: BinaryIO, options: Mapping[str, Any]) -> Iterator[Parsed]:
    """The records of an XML feed, read as the stream arrives; options are checked at once."""
    return _parse(source, XmlSettings.from_options(options))


def _parse(source: BinaryIO, settings: XmlSettings) -> Iterator[Parsed]:
    try:
        yield from _records(iterparse(source, events=("start", "end")), settings)
    except EntitiesForbidden as error:
        raise FeedError(
            f"forbidden_xml: entity {error.name!r} declared; entity expansion and external "
            "entities are refused"
        ) from error
    except ExternalReferenceForbidden as error:
        raise FeedError(f"forbidden_xml: external reference {error.sysid!r}") from error
    except DefusedXmlException as error:
        raise FeedError(f"forbidden_xml: {error}") from error
    except ParseError as error:
        raise FeedError(f"malformed_xml: {error}") from error
    except ValueError as error:
        # The declaration names an encoding expat cannot read (`shift_jis`, `utf-32`: "multi-
        # byte encodings are not supported"): malformed, where it failed the delivery eight
        # times over (a fuzzing walkthrough).
        if "encoding" not in str(error):
            raise
        raise FeedError(f"malformed_xml: {error}") from error
    except RecursionError as error:
        raise FeedError("too_deeply_nested: a record nests its elements too deep") from error
    except LookupError as error:
        # The declaration names an encoding Python does not know (`encoding="x-bogus"`):
        # malformed, where it failed the delivery eight times over (a fuzzing walkthrough).
        # Only that: a KeyError or IndexError is a bug of ours, to be tried again.
        if type(error) is not LookupError:
            raise
        raise FeedError(f"malformed_xml: {error}") from error


# The quantity element's attributes read as its unit, where the record names none.
UNIT_ATTRIBUTES = tuple(map(normalise_name, ("uom", "unit", "unit_of_measure")))

# Elements nested deeper than this are refused (as the JSON parser refuses its values).
MAX_DEPTH = 64


def _records(events: Iterator[tuple[str, Any]], settings: XmlSettings) -> Iterator[Parsed]:
    record = settings.record
    candidates = {record} if record else RECORD_NAMES
    open_elements: list[Element] = []
    record_depth = 0  # the depth of the record being read, 0 outside records
    position, undecided = 0, 0
    root_has_children = False
    for event, element in events:
        name = _loose(element.tag)
        if event == "start":
            if len(open_elements) >= MAX_DEPTH:
                # No feed nests so deep; the checks below look up the open elements, so
                # a file of 200,000 nested elements took hours, holding up every delivery.
                raise FeedError(f"too_deeply_nested: more than {MAX_DEPTH} levels")
            root_has_children = root_has_children or len(open_elements) == 1
            if record_depth == 0 and name == record and open_elements:
                record_depth = len(open_elements) + 1
            open_elements.append(element)
            continue
        open_elements.pop()
        found: list[Element] = []
        if record_depth == len(open_elements) + 1:
            record_depth, found = 0, [element]
        elif record_depth:
            continue
        elif record is None and open_elements and name in candidates:
            nested = any(_loose(e.tag) in candidates for e in open_elements[1:])
            if not _is_record(element, settings, nested):
                undecided += 1
                if undecided > MAX_UNDECIDED:
                    names = "/".join(sorted(candidates))
                    reason = f"none of the first {MAX_UNDECIDED} <{names}> elements is a record"
                    raise FeedError(f"no_records: {reason}")
                continue  # kept: it is one if a later sibling of its name proves a record
            record = name
            found = _up_to(element, open_elements[-1], name)
        elif record is None and any(_loose(e.tag) in candidates for e in open_elements[1:]):
            continue  # may be a field of a record not yet recognised
        elif name == record and open_elements:
            # One of the record's name begun before the name was known: the record that
            # held the one that decided it (`<product>` with `<parts><product>`). It was
            # dropped, and its stock with it, unsaid (a fuzzing walkthrough).
            found = [element]
        for each in found:
            position += 1
            yield _record(position, each, settings)
            _drop(each, open_elements)
        if not found:
            _drop(element, open_elements)
    if position == 0 and root_has_children:
        names = "/".join(sorted(candidates))
        raise FeedError(f"no_records: no <{names}> record element below the root")


def _record(position: int, element: Element, settings: XmlSettings) -> Parsed:
    names = _Names(element)
    try:
        values = {field: names.lookup(paths) for field, paths in settings.paths.items()}
        if values.get("unit") is None and "quantity" in settings.paths:
            # `<Available uom="CS">2</Available>`: the unit on the quantity's own element,
            # as XML feeds often write it (read as pieces, it counted a twelfth of the stock).
            values["unit"] = names.attribute_of(settings.paths["quantity"], UNIT_ATTRIBUTES)
        if "incoming_quantity" in settings.paths:
            # So is the incoming quantity's (`<Inbound><Qty uom="CS">1</Qty>`: read as one
            # piece, a walkthrough).
            values["incoming_unit"] = names.attribute_of(
                settings.paths["incoming_quantity"], UNIT_ATTRIBUTES
            )
    except _Repeated as repeated:
        return RecordError(position, str(repeated), _as_dict(element))
    return make_record(position, values, _as_dict(element), settings.value_format)


class _Repeated(Exception):
    """A field's element, or one on its path, appears more than once in the record: which
    one is meant? The first was read and the others dropped, unsaid (two `<stock>` of two
    warehouses read as the first's: a walkthrough), as CSV refuses a column given twice
    and EDI a QTY given twice."""

    def __init__(self, path: str, count: int) -> None:
        super().__init__(f"repeated_field: {path} has {count} values; a record has one")


def _is_record(element: Element, settings: XmlSettings, nested: bool) -> bool:
    """Whether the first element of a candidate name is a record (not a field, a wrapper).

    One with an identifier is; so is one with child elements unless it sits inside
    another candidate (e.g. <stock><available>3</available></stock> inside a <product>).
    """
    names = _Names(element)
    try:
        identified = any(names.lookup(settings.paths[f]) is not None for f in IDENTIFIERS)
    except _Repeated:
        identified = True  # an identifier given twice: a record, refused as one
    return identified or (len(element) > 0 and not nested)


def _up_to(element: Element, parent: Element, name: str) -> list[Element]:
    """The element with its earlier siblings of the same name, which were not recognised."""
    siblings: list[Element] = []
    for child in parent:
        if _loose(child.tag) == name:
            siblings.append(child)
        if child is element:
            return siblings
    return [element]


class _Names:
    """A record's children and attributes by loose name, each element indexed once."""

    def __init__(self, element: Element) -> None:
        self._index: dict[int, tuple[dict[str, list[Element]], dict[str, str]]] = {}
        self._top = self._of(element)

    def lookup(self, paths: tuple[FieldPath, ...]) -> str | None:
        """The first value found at one of the paths (an element with children is none)."""
        for path in paths:
            value = self._follow(path)
            if value is not None:
                return value
        return None

    def attribute_of(self, paths: tuple[FieldPath, ...], names: tuple[str, ...]) -> str | None:
        """One of these attributes of the element the first path that finds a value leads
        to (the element `lookup` reads its value from)."""
        for path in paths:
            if path[-1].startswith("@"):
                continue
            leaves = self._leaves(path)
            if len(leaves) > 1:
                raise _Repeated("/".join(path), len(leaves))
            if leaves:
                _, attributes = self._of(leaves[0])
                return next((attributes[name] for name in names if name in attributes), None)
        return None

    def _follow(self, path: FieldPath) -> str | None:
        """The value at the path: an element's text, or an attribute; None where there is
        none (an element with children has none). More than one, where elements on the
        path are repeated, is refused (`_Repeated`): repeated elements that give no value
        there (wrappers with children, say) are no matter."""
        *steps, last = path
        if last.startswith("@"):
            values = [
                attributes[last[1:]]
                for _, attributes in self._ends(tuple(steps))
                if last[1:] in attributes
            ]
        else:
            values = [leaf.text or "" for leaf in self._leaves(path)]
            if not values and not self._elements(path):
                # A plain name that matches no child element reads the attribute of that name.
                values = [
                    attributes[last]
                    for _, attributes in self._ends(tuple(steps))
                    if last in attributes
                ]
        if len(values) > 1:
            raise _Repeated("/".join(path), len(values))
        return values[0] if values else None

    def _ends(self, steps: FieldPath) -> list[tuple[dict[str, list[Element]], dict[str, str]]]:
        """The children and attributes of every element the steps lead to."""
        found = [self._top]
        for segment in steps:
            if segment.startswith("@"):
                return []
            found = [
                self._of(child) for children, _ in found for child in children.get(segment, [])
            ]
        return found

    def _elements(self, path: FieldPath) -> list[Element]:
        """Every element at the end of the path."""
        *steps, last = path
        ends = self._ends(tuple(steps))
        return [element for children, _ in ends for element in children.get(last, [])]

    def _leaves(self, path: FieldPath) -> list[Element]:
        """The elements at the end of the path that hold a value (no children)."""
        return [element for element in self._elements(path) if not len(element)]

    def _of(self, element: Element) -> tuple[dict[str, list[Element]], dict[str, str]]:
        if id(element) not in self._index:
            children: dict[str, list[Element]] = {}
            for child in element:
                children.setdefault(_loose(child.tag), []).append(child)
            attributes: dict[str, str] = {}
            for key, value in element.attrib.items():
                attributes.setdefault(_loose(key), value)
            self._index[id(element)] = (children, attributes)
        return self._index[id(element)]


def _as_dict(element: Element) -> dict[str, Any]:
    """The element as JSON-ready data: attributes, children by local name, text."""
    data: dict[str, Any] = {f"@{_local(key)}": value for key, value in element.attrib.items()}
    for child in element:
        key = _local(child.tag)
        value: Any = _as_dict(child) if len(child) or child.attrib else (child.text or "").strip()
        if key in data:
            previous = data[key]
            data[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            data[key] = value
    text = (element.text or "").strip()
    if text:
        data["#text"] = text
    return data


def _drop(element: Element, open_elements: list[Element]) -> None:
    """Forget an element read to its end, so that memory stays flat whatever the length."""
    element.clear()
    if not open_elements:
        return
    parent = open_elements[-1]
    # The parser runs ahead of the events: later siblings may already follow this one.
    if len(parent) and parent[0] is element:
        del parent[0]
    else:
        parent.remove(element)


def _local(name: str) -> str:
    return name.rpartition("}")[2]


def _loose(name: str) -> str:
    """A local name compared loosely; an attribute keeps its leading "@"."""
    local = _local(name)
    return "@" + normalise_name(local[1:]) if local.startswith("@") else normalise_name(local)
