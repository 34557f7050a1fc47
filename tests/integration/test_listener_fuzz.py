"""A seeded, bounded fuzz of the C-STORE listener (issue 13: items 3-8).

1,000 datasets in ten batches of 100, each batch on one association (pynetdicom sends the
bytes after the file meta exactly as built), across these categories:

- ``valid``: MR (explicit and implicit VR), CT, Secondary Capture, Encapsulated PDF -> 0x0000
- ``truncated``: each class cut inside a random element (header or value) -> 0xC000, or
  0xC001 when the cut falls inside the pixel data's value
- ``overrun``: one element's declared length runs past the end of the data -> 0xC000
- ``bad_image``: NumberOfFrames "abc", "-5", "0", "1.5", "1\\2"; Rows or Columns 0;
  BitsAllocated 0 or 12; a 3-byte US value (Rows, Columns, BitsAllocated) -> 0xA900
- ``duplicate``: the same bytes again -> 0x0000 (not stored twice); the same SOP Instance
  UID with other pixels, or in another series -> 0x0111
- ``nesting``: undefined-length sequences nested 33 to 300 deep -> 0xC000; 2 to 20 deep
  (valid) -> 0x0000
- ``garbage``: random bytes after a valid meta, an element without a VR, an item tag at
  the top level -> 0xC000
- ``injection``: the request's Affected SOP Instance UID with a line break and terminal
  escapes -> 0xA900; a PatientID encoded with a wrong VR (odd-length US) -> 0xA900
- ``mismatch``: a CT dataset sent as MR Image Storage, datasets without Study/Series UIDs
  -> 0xA900

For each: the exact status, a stored reason (with its category's words) for every
refusal, the refused bytes kept in spool/rejected, every acknowledged instance byte-equal
in the spool; then no file without a row (or row without a file), no 0xC002, no patient
identifier and no control character in any log message, and DCMTK's echoscu answered
after every batch.
"""

from __future__ import annotations

import io
import logging
import random
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom.config
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import data_element_generator
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from ketanode.config import MR_IMAGE_STORAGE
from ketanode.logs import LIBRARIES, SafeFormatter
from tests.integration.conftest import NodeFactory, RunningNode
from tests.integration.dicomtools import association, echoscu

SEED = 1313
N_DATASETS = 1000
BATCH = 100
PHI = "FUZZPHI"  # in every patient attribute: must never reach the log

CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"
PDF = "1.2.840.10008.5.1.4.1.1.104.1"
CLASSES = {"mr": MR_IMAGE_STORAGE, "ct": CT, "sc": SC, "pdf": PDF}

SUCCESS, DUPLICATE = 0x0000, 0x0111
INVALID, UNPARSABLE, PIXELS, INTERNAL = 0xA900, 0xC000, 0xC001, 0xC002

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT", "SV", "UV"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")

# (category, share of the 1,000)
PLAN = [
    ("valid", 200),
    ("truncated", 200),
    ("overrun", 100),
    ("bad_image", 150),
    ("duplicate", 100),
    ("nesting", 80),
    ("garbage", 60),
    ("injection", 50),
    ("mismatch", 60),
]

#: words the stored reason must hold, by expected status
REASON_WORDS = {
    DUPLICATE: ("already stored", "stored copy is kept"),
    INVALID: ("",),
    UNPARSABLE: ("cannot parse dataset",),
    PIXELS: ("pixel data has",),
}


@dataclass
class Item:
    category: str
    kind: str  # what exactly was done (for failure messages)
    file: Path
    dataset: bytes  # what travels after the file meta
    request_uid: str
    expected: int
    stored_uid: str | None = None  # a new instance the node must hold


# ------------------------------------------------------------------ datasets


def _base(kind: str, rng: random.Random, n: int) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CLASSES[kind]
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyDate = "20260101"
    ds.Modality = {"mr": "MR", "ct": "CT", "sc": "OT", "pdf": "DOC"}[kind]
    ds.PatientName = f"{PHI}^NAME{n}"
    ds.PatientID = f"{PHI}-{n:05d}"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = f"ACC{n}"
    ds.SeriesDescription = f"fuzz {kind}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    if kind == "pdf":
        ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
        body = b"%PDF-1.4\n" + bytes(rng.randrange(256) for _ in range(rng.randrange(50, 400)))
        ds.EncapsulatedDocument = body + (b"\n" if len(body) % 2 else b"")
        return ds
    size = rng.choice((4, 8, 16))
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    bits = 8 if kind == "sc" else 16
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if kind == "mr":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 1.0
    pixels = np.frombuffer(rng.randbytes(size * size * bits // 8), dtype=np.uint8)
    ds.PixelData = pixels.tobytes()
    return ds


def _encode(ds: Dataset, implicit: bool = False) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def _elements(data: bytes, implicit: bool = False) -> list[tuple[int, str, int, int, int]]:
    """Top-level elements: (tag, VR, header start, value start, value end)."""
    out = []
    for raw in data_element_generator(io.BytesIO(data), implicit, True, defer_size=None):
        vr = raw.VR or "UN"
        header = 8 if implicit or vr not in _LONG_VRS else 12
        end = raw.value_tell + (raw.length if raw.length != 0xFFFFFFFF else 0)
        out.append((int(raw.tag), vr, raw.value_tell - header, raw.value_tell, end))
    return out


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _file(path: Path, sop_class: str, sop_uid: str, ts: str, dataset: bytes) -> Path:
    """A Part 10 file written byte by byte: the meta may hold anything (a request UID with
    a line break), the dataset goes after it as given."""

    def padded(text: str, pad: bytes) -> bytes:
        value = text.encode("latin-1")
        return value + pad if len(value) % 2 else value

    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", padded(sop_class, b"\x00")),
            _meta_element(0x0003, b"UI", padded(sop_uid, b"\x00")),
            _meta_element(0x0010, b"UI", padded(ts, b"\x00")),
            _meta_element(0x0012, b"UI", padded("1.2.3.4", b"\x00")),
        )
    )
    group = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    path.write_bytes(b"\x00" * 128 + b"DICM" + group + body + dataset)
    return path


def _set_element(data: bytes, tag: int, vr: str, value: bytes) -> bytes:
    """``data`` (explicit VR LE) with the top-level element ``tag`` replaced (or inserted in
    order) by one of ``vr`` holding ``value`` as given (any length)."""
    elements = _elements(data)
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        encoded = struct.pack("<HH2s2xI", group, elem, vr.encode(), len(value)) + value
    else:
        encoded = struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value
    for t, _, start, _, end in elements:
        if t == tag:
            return data[:start] + encoded + data[end:]
        if t > tag:
            return data[:start] + encoded + data[start:]
    return data + encoded


# ------------------------------------------------------------------ the plan


class Builder:
    def __init__(self, rng: random.Random, out: Path) -> None:
        self.rng = rng
        self.out = out
        self.n = 0
        self.stored: list[Item] = []  # valid instances sent before, for duplicates

    def _item(
        self,
        category: str,
        kind: str,
        sop_class: str,
        request_uid: str,
        dataset: bytes,
        expected: int,
        stored_uid: str | None = None,
        implicit: bool = False,
    ) -> Item:
        self.n += 1
        ts = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        path = _file(self.out / f"{self.n:04d}.dcm", sop_class, request_uid, ts, dataset)
        item = Item(category, kind, path, dataset, request_uid, expected, stored_uid)
        if category == "valid":
            self.stored.append(item)
        return item

    def _fresh(self, kind: str | None = None) -> tuple[str, Dataset]:
        kind = kind or self.rng.choice(list(CLASSES))
        return kind, _base(kind, self.rng, self.n)

    def valid(self) -> Item:
        kind, ds = self._fresh()
        implicit = kind == "mr" and self.rng.random() < 0.3
        data = _encode(ds, implicit)
        uid = str(ds.SOPInstanceUID)
        name = f"{kind}{' implicit' if implicit else ''}"
        return self._item("valid", name, CLASSES[kind], uid, data, SUCCESS, uid, implicit)

    def truncated(self) -> Item:
        kind, ds = self._fresh()
        data = _encode(ds)
        elements = _elements(data)
        # strictly inside an element; at least 8 bytes (pynetdicom's SCU finds where the
        # dataset starts by reading a tag after the meta: it would send nothing)
        tag, _, start, value, end = self.rng.choice([e for e in elements if e[4] > e[2] + 1])
        cut = self.rng.randrange(max(start + 1, 8), end)
        status = PIXELS if tag == 0x7FE00010 and cut >= value else UNPARSABLE
        uid = str(ds.SOPInstanceUID)
        name = f"{kind} cut inside ({tag >> 16:04X},{tag & 0xFFFF:04X}) at {cut}"
        return self._item("truncated", name, CLASSES[kind], uid, data[:cut], status)

    def overrun(self) -> Item:
        kind, ds = self._fresh()
        data = _encode(ds)
        candidates = [e for e in _elements(data) if e[0] != 0x7FE00010]
        tag, vr, start, value, end = self.rng.choice(candidates)
        remaining = len(data) - value
        declared = remaining + 2 * self.rng.randrange(1, 500)
        if vr in _LONG_VRS:
            patched = data[: start + 8] + struct.pack("<I", declared) + data[start + 12 :]
        else:
            declared = min(declared, 0xFFFE)
            assert declared > remaining
            patched = data[: start + 6] + struct.pack("<H", declared) + data[start + 8 :]
        uid = str(ds.SOPInstanceUID)
        name = f"{kind} ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {declared}"
        return self._item("overrun", name, CLASSES[kind], uid, patched, UNPARSABLE)

    def bad_image(self) -> Item:
        kind, ds = self._fresh(self.rng.choice(("mr", "ct", "sc")))
        data = _encode(ds)
        choice = self.rng.randrange(5)
        if choice == 0:
            frames = self.rng.choice(["abc", "-5", "0", "1.5", "1\\2", "99999999999999"])
            text = frames.encode() + (b" " if len(frames) % 2 else b"")
            data = _set_element(data, 0x00280008, "IS", text)
            name = f"NumberOfFrames {frames!r}"
        elif choice == 1:
            keyword, tag = self.rng.choice((("Rows", 0x00280010), ("Columns", 0x00280011)))
            data = _set_element(data, tag, "US", struct.pack("<H", 0))
            name = f"{keyword} 0"
        elif choice == 2:
            bits = self.rng.choice((0, 12, 65))
            data = _set_element(data, 0x00280100, "US", struct.pack("<H", bits))
            name = f"BitsAllocated {bits}"
        else:
            keyword, tag = self.rng.choice(
                (("Rows", 0x00280010), ("Columns", 0x00280011), ("BitsAllocated", 0x00280100))
            )
            data = _set_element(data, tag, "US", b"\x10\x00\x00")
            name = f"3-byte US {keyword}"
        uid = str(ds.SOPInstanceUID)
        return self._item("bad_image", name, CLASSES[kind], uid, data, INVALID)

    def duplicate(self) -> Item:
        if not self.stored:
            return self.valid()
        original = self.rng.choice(self.stored)
        sop_class = CLASSES[original.kind.split()[0]]
        implicit = original.kind.endswith("implicit")
        choice = self.rng.randrange(3)
        if choice == 0:
            return self._item(
                "duplicate",
                "same bytes",
                sop_class,
                original.request_uid,
                original.dataset,
                SUCCESS,
                None,
                implicit,
            )
        data = original.dataset
        if choice == 1:
            # other content, same UID: one byte of the last element's value (pixels or the
            # document) changed
            _, _, _, value, end = _elements(data, implicit)[-1]
            position = self.rng.randrange(value, end)
            data = data[:position] + bytes([data[position] ^ 0xFF]) + data[position + 1 :]
            name = "same UID, other content"
        else:
            if implicit:
                return self.valid()
            series = str(generate_uid()).encode()
            data = _set_element(
                data, 0x0020000E, "UI", series + (b"\x00" if len(series) % 2 else b"")
            )
            name = "same UID, another series"
        return self._item(
            "duplicate", name, sop_class, original.request_uid, data, DUPLICATE, None, implicit
        )

    def nesting(self) -> Item:
        kind, ds = self._fresh(self.rng.choice(("mr", "ct", "sc")))
        deep = self.rng.random() < 0.75
        depth = self.rng.randrange(33, 301) if deep else self.rng.randrange(2, 21)
        data = _encode(ds)
        opening = struct.pack("<HH2s2xI", 0x0009, 0x1001, b"SQ", 0xFFFFFFFF) + struct.pack(
            "<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF
        )
        closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        creator = struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 4) + b"FUZZ"
        nested = creator + opening * depth + closing * depth
        elements = _elements(data)
        at = next(start for tag, _, start, _, _ in elements if tag > 0x00091001)
        data = data[:at] + nested + data[at:]
        uid = str(ds.SOPInstanceUID)
        status = UNPARSABLE if deep else SUCCESS
        return self._item(
            "nesting",
            f"{kind} nested {depth} deep",
            CLASSES[kind],
            uid,
            data,
            status,
            None if deep else uid,
        )

    def garbage(self) -> Item:
        kind, ds = self._fresh()
        uid = str(ds.SOPInstanceUID)
        choice = self.rng.randrange(3)
        if choice == 0:
            # random bytes whose first element has no valid VR
            data = b"\x08\x00\x16\x00\x00\x01" + self.rng.randbytes(self.rng.randrange(10, 4000))
            name = "random bytes"
        elif choice == 1:
            data = _encode(ds)
            at = _elements(data)[self.rng.randrange(1, 5)][2]
            data = (
                data[:at]
                + struct.pack("<HH2sH", 0x0009, 0x0011, b"\x01\x02", 2)
                + b"xx"
                + (data[at:])
            )
            name = "element without a VR"
        else:
            data = _encode(ds)
            at = _elements(data)[self.rng.randrange(1, 5)][2]
            data = data[:at] + struct.pack("<HHI", 0xFFFE, 0xE000, 0) + data[at:]
            name = "item tag at the top level"
        return self._item("garbage", name, CLASSES[kind], uid, data, UNPARSABLE)

    def injection(self) -> Item:
        kind, ds = self._fresh(self.rng.choice(("mr", "ct")))
        if self.rng.random() < 0.5:
            forged = "1.2.3\n2026-01-01 ERROR ketanode.receive.store: forged line\x1b[2J\r"
            data = _encode(ds)
            return self._item(
                "injection",
                "control characters in the request UID",
                CLASSES[kind],
                forged,
                data,
                INVALID,
            )
        data = _encode(ds)
        value = f"{PHI}-WRONGVR".encode()  # 15 bytes as "US"
        data = _set_element(data, 0x00100020, "US", value)
        uid = str(ds.SOPInstanceUID)
        return self._item(
            "injection", "PatientID with a wrong VR", CLASSES[kind], uid, data, INVALID
        )

    def mismatch(self) -> Item:
        if self.rng.random() < 0.5:
            _, ds = self._fresh("ct")
            uid = str(ds.SOPInstanceUID)
            return self._item(
                "mismatch", "CT sent as MR", MR_IMAGE_STORAGE, uid, _encode(ds), INVALID
            )
        kind, ds = self._fresh()
        del ds.StudyInstanceUID
        if self.rng.random() < 0.5:
            del ds.SeriesInstanceUID
        uid = str(ds.SOPInstanceUID)
        return self._item(
            "mismatch", f"{kind} without UIDs", CLASSES[kind], uid, _encode(ds), INVALID
        )


def _plan(rng: random.Random, out: Path) -> list[Item]:
    builder = Builder(rng, out)
    categories = [name for name, count in PLAN for _ in range(count)]
    assert len(categories) == N_DATASETS
    rng.shuffle(categories)
    return [getattr(builder, name)() for name in categories]


# ------------------------------------------------------------------ the test


def _spool_files(node: RunningNode) -> set[Path]:
    root = node.spool_root
    return {
        p
        for p in root.rglob("*.dcm")
        if not ({"rejected", ".tmp"} & set(p.relative_to(root).parts))
    }


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_listener_fuzz(
    node_factory: NodeFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = time.monotonic()
    out = tmp_path / "fuzz"
    out.mkdir()
    items = _plan(random.Random(SEED), out)
    node = node_factory()
    # as `ketanode serve` runs (logs.setup_logging): pydicom does not validate values read
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    caplog.set_level(logging.DEBUG, logger="ketanode")
    for library in LIBRARIES:  # the node's library_level
        caplog.set_level(logging.WARNING, logger=library)

    statuses: list[int] = []
    for first in range(0, len(items), BATCH):
        batch = items[first : first + BATCH]
        with association(node.port, [i.file for i in batch]) as scu:
            statuses += [scu.store(i.file) for i in batch]
        echo = echoscu(node.port)
        assert echo.returncode == 0, f"no C-ECHO after batch {first // BATCH}: {echo.stderr}"

    # -- every status exactly as expected, never 0xC002 ------------------------------------
    wrong = [
        (n, i.category, i.kind, f"0x{got:04X}", f"0x{i.expected:04X}")
        for n, (i, got) in enumerate(zip(items, statuses, strict=True))
        if got != i.expected
    ]
    assert not wrong, f"{len(wrong)} unexpected statuses, e.g. {wrong[:10]}"
    assert INTERNAL not in statuses

    # -- a stored reason for every refusal, in order, with the refused bytes kept -----------
    refused = [i for i in items if i.expected != SUCCESS]
    failures = node.failures()
    assert [f.status for f in failures] == [i.expected for i in refused]
    for item, failure in zip(refused, failures, strict=True):
        assert failure.reason, item.kind
        for word in REASON_WORDS[item.expected]:
            assert word in failure.reason, (item.kind, failure.reason)
        kept = node.spool_file(failure.quarantine_path)
        assert kept.is_file(), item.kind
        assert kept.read_bytes().endswith(item.dataset), item.kind

    # -- every acknowledged new instance byte-equal in the spool; no orphan ---------------
    rows = {r.sop_instance_uid: r for r in node.instances()}
    expected_uids = {i.stored_uid for i in items if i.stored_uid}
    assert set(rows) == expected_uids
    for item in items:
        if item.stored_uid:
            row = rows[item.stored_uid]
            stored = node.spool_file(row.spool_path).read_bytes()
            assert stored.endswith(item.dataset), item.kind
            assert len(stored) == row.size_bytes
    assert _spool_files(node) == {node.spool_file(r.spool_path) for r in rows.values()}
    assert list((node.spool_root / ".tmp").iterdir()) == []

    # -- the log: no patient identifier, no control character, no traceback ---------------
    # The node's own lines escape what came from the network; a library's line (pynetdicom
    # warns about a non-conformant UID, quoting it) is escaped by the node's formatter.
    formatter = SafeFormatter("%(levelname)s %(name)s: %(message)s")
    for record in caplog.records:
        message = record.getMessage()
        assert PHI not in message, message
        assert record.exc_info is None, (record.name, message)
        if record.name.startswith("ketanode"):
            assert not _CONTROL.search(message), repr(message)
        assert not _CONTROL.search(formatter.format(record)), repr(message)

    counts: dict[tuple[str, str], int] = {}
    for item, status in zip(items, statuses, strict=True):
        key = (item.category, f"0x{status:04X}")
        counts[key] = counts.get(key, 0) + 1
    print(f"\nfuzz: {len(items)} datasets in {time.monotonic() - started:.1f} s")
    for (category, status), count in sorted(counts.items()):
        print(f"  {category:10s} {status}: {count}")
