"""The structure of an encoded dataset, checked before anything reads its values.

pydicom reads almost any byte stream without complaint: a value whose declared length runs
past the end of the data comes back short, a missing sequence delimiter ends the dataset
quietly, and deep nesting ends in a RecursionError. ``check_structure`` walks every element
of every item of every sequence (without recursion, without decoding or copying values) and
raises ``Malformed`` at the first place where the bytes do not parse to their declared
lengths. Values of a fixed-width VR (US, UL, FD...) whose length is not a multiple of that
width are not a structural fault (the walk can go on); they are returned, so the caller can
refuse the dataset for its invalid attribute.

Messages name byte offsets, tags, VRs and lengths only, never a value. A tag read where
the data is not what it claims could be any four bytes of it, so each fault also has a
``summary`` without tags, for the log.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, keyword_for_tag

#: Sequences nested deeper than this are refused (real objects nest a few levels; an SR
#: content tree perhaps a dozen). pydicom parses nested sequences recursively.
MAX_DEPTH = 32

# Explicit VRs with a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_KNOWN_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
_WIDTH = {
    "US": 2,
    "SS": 2,
    "OW": 2,
    "UL": 4,
    "SL": 4,
    "FL": 4,
    "AT": 4,
    "OF": 4,
    "OL": 4,
    "FD": 8,
    "OD": 8,
    "SV": 8,
    "UV": 8,
    "OV": 8,
}
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_DATA = 0x7FE00010


class Malformed(Exception):
    """The bytes do not parse to their declared lengths (the message holds no values;
    ``summary`` holds no tags either)."""

    def __init__(self, message: str, summary: str | None = None) -> None:
        super().__init__(message)
        self.summary = summary or message


class ShortValue(Malformed):
    """A value whose declared length runs past the end of the data."""

    def __init__(self, message: str, summary: str, tag: int, declared: int, remaining: int) -> None:
        super().__init__(message, summary)
        self.tag = tag
        self.declared = declared
        self.remaining = remaining


@dataclass(frozen=True)
class BadWidth:
    tag: int
    vr: str
    length: int

    def describe(self, with_tag: bool = True) -> str:
        name = keyword_for_tag(self.tag) or "a private or unknown attribute"
        width = _WIDTH[self.vr]
        where = f" {tag_text(self.tag)}" if with_tag else ""
        return f"{name}{where} has a {self.length}-byte {self.vr} value (not a multiple of {width})"


@dataclass
class Structure:
    elements: int = 0
    depth: int = 0
    bad_widths: list[BadWidth] = field(default_factory=list)


def tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _implicit_vr(tag: int) -> str:
    if (tag >> 16) % 2 == 1:
        return "UN"  # private: its VR is not known here
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0] if " or " in vr else vr


@dataclass
class _Container:
    kind: str  # "dataset" | "sequence" | "fragments"
    end: int | None  # None: undefined length (ends at its delimiter)
    implicit: bool
    depth: int
    top: bool = False


def inflate(data: bytes) -> bytes:
    """A Deflated Explicit VR Little Endian dataset, inflated (raw deflate, RFC 1951)."""
    try:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        out = inflater.decompress(data) + inflater.flush()
    except zlib.error as exc:
        raise Malformed("deflated dataset does not inflate") from exc
    if not inflater.eof:
        raise Malformed("deflated dataset ends before its deflate stream does")
    return out


def check_structure(
    data: bytes, offset: int, implicit: bool, little: bool, max_depth: int = MAX_DEPTH
) -> Structure:
    """Walk the dataset encoded in ``data[offset:]``; raise ``Malformed`` at the first fault."""
    order = "<" if little else ">"
    u16 = struct.Struct(order + "H")
    u32 = struct.Struct(order + "I")
    tag_struct = struct.Struct(order + "HH")
    total = len(data)
    result = Structure()
    stack = [_Container("dataset", total, implicit, 0, top=True)]
    pos = offset
    while stack:
        box = stack[-1]
        limit = box.end if box.end is not None else _limit(stack, total)
        if box.end is not None and pos == box.end:
            if box.top:
                return result
            stack.pop()
            continue
        if pos + 8 > limit:
            where = "the data" if box.top else f"its {_kind_text(box)}"
            raise Malformed(
                f"element header at byte {pos} runs past the end of {where} "
                f"({limit - pos} bytes left)"
            )
        group, elem = tag_struct.unpack_from(data, pos)
        tag = (group << 16) | elem
        if group == 0xFFFE:
            length = u32.unpack_from(data, pos + 4)[0]
            pos = _delimiter_or_item(stack, box, tag, length, pos, limit, max_depth, result)
            continue
        if box.kind != "dataset":
            raise Malformed(
                f"{tag_text(tag)} at byte {pos} where a sequence item was expected",
                f"an element at byte {pos} where a sequence item was expected",
            )
        result.elements += 1
        if box.implicit:
            vr = _implicit_vr(tag)
            length = u32.unpack_from(data, pos + 4)[0]
            header = 8
        else:
            vr_bytes = bytes(data[pos + 4 : pos + 6])
            if vr_bytes not in _KNOWN_VRS:
                raise Malformed(
                    f"{tag_text(tag)} at byte {pos} has no valid VR",
                    f"element at byte {pos} has no valid VR",
                )
            vr = vr_bytes.decode("ascii")
            if vr_bytes in _LONG_VRS:
                if pos + 12 > limit:
                    raise Malformed(f"element header at byte {pos} runs past the end")
                length = u32.unpack_from(data, pos + 8)[0]
                header = 12
            else:
                length = u16.unpack_from(data, pos + 6)[0]
                header = 8
        start = pos + header
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA and vr in ("OB", "OW", "UN"):
                stack.append(_Container("fragments", None, box.implicit, box.depth))
            elif vr in ("SQ", "UN") or box.implicit:
                depth = box.depth + 1
                if depth > max_depth:
                    raise Malformed(f"sequences nested more than {max_depth} deep")
                result.depth = max(result.depth, depth)
                # an undefined-length UN holds an Implicit VR Little Endian sequence
                items_implicit = box.implicit or vr == "UN"
                stack.append(_Container("sequence", None, items_implicit, depth))
            else:
                raise Malformed(
                    f"{tag_text(tag)} ({vr}) at byte {pos} has an undefined length",
                    f"a {vr} element at byte {pos} has an undefined length",
                )
            pos = start
            continue
        if start + length > limit:
            remaining = max(limit - start, 0)
            raise ShortValue(
                f"{tag_text(tag)} ({vr}) at byte {pos} declares {length} bytes, {remaining} remain",
                f"a {vr} value at byte {pos} declares {length} bytes, {remaining} remain",
                tag,
                length,
                remaining,
            )
        if vr == "SQ":
            depth = box.depth + 1
            if depth > max_depth:
                raise Malformed(f"sequences nested more than {max_depth} deep")
            result.depth = max(result.depth, depth)
            stack.append(_Container("sequence", start + length, box.implicit, depth))
            pos = start
            continue
        width = _WIDTH.get(vr)
        if width and length % width:
            result.bad_widths.append(BadWidth(tag, vr, length))
        pos = start + length
    return result  # pragma: no cover (the top-level dataset returns above)


def _limit(stack: list[_Container], total: int) -> int:
    """Where an undefined-length container must end at the latest: its nearest defined
    ancestor's end."""
    for box in reversed(stack):
        if box.end is not None:
            return box.end
    return total


def _kind_text(box: _Container) -> str:
    return {"dataset": "its item", "sequence": "its sequence", "fragments": "its fragments"}[
        box.kind
    ]


def _delimiter_or_item(
    stack: list[_Container],
    box: _Container,
    tag: int,
    length: int,
    pos: int,
    limit: int,
    max_depth: int,
    result: Structure,
) -> int:
    """An (FFFE,xxxx) tag at ``pos``: an item, or the end of an item or sequence. Returns
    the new position."""
    if tag == _ITEM and box.kind in ("sequence", "fragments"):
        start = pos + 8
        if length == _UNDEFINED:
            if box.kind == "fragments":
                raise Malformed(f"pixel data fragment at byte {pos} has an undefined length")
            stack.append(_Container("dataset", None, box.implicit, box.depth))
            return start
        if start + length > limit:
            raise Malformed(
                f"item at byte {pos} declares {length} bytes, {max(limit - start, 0)} remain"
            )
        if box.kind == "fragments":
            return start + length
        stack.append(_Container("dataset", start + length, box.implicit, box.depth))
        return start
    if tag == _ITEM_END and box.kind == "dataset" and not box.top:
        if box.end is not None and pos + 8 != box.end:
            raise Malformed(f"item delimiter at byte {pos} inside a defined-length item")
        stack.pop()
        return pos + 8
    if tag == _SEQ_END and box.kind in ("sequence", "fragments") and box.end is None:
        stack.pop()
        return pos + 8
    raise Malformed(
        f"unexpected {tag_text(tag)} at byte {pos}", f"unexpected item or delimiter at byte {pos}"
    )
