"""The C-STORE hot path's shortcuts give exactly what the slow, general way gives: the file
meta written without pydicom, and the dataset read after it without dcmread."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from pydicom import dcmread, dcmwrite
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
)
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from ketanode.receive import store
from ketanode.synthetic.phantom import simple_head
from ketanode.synthetic.series_writer import SeriesSpec, write_series

MR = "1.2.840.10008.5.1.4.1.1.4"


class _Event:
    """What ``_part10`` uses of a pynetdicom C-STORE event."""

    def __init__(self, dataset: bytes, sop_class: str, sop_uid: str, ts: str) -> None:
        self.dataset, self.sop_class, self.sop_uid, self.ts = dataset, sop_class, sop_uid, ts

    def encoded_dataset(self, include_meta: bool = True) -> bytes:
        if not include_meta:
            return self.dataset
        meta = create_file_meta(
            sop_class_uid=self.sop_class, sop_instance_uid=self.sop_uid, transfer_syntax=self.ts
        )
        return b"\x00" * 128 + b"DICM" + encode_file_meta(meta) + self.dataset


@pytest.mark.parametrize("sop_uid", ["1.2.3.4", "1.2.3.45", "1.2.826.0.1.3680043.8." + "7" * 42])
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless])
def test_file_meta_is_byte_for_byte_pynetdicoms(sop_uid: str, ts: str) -> None:
    event = _Event(b"\x08\x00\x16\x00UI\x02\x001\x00", MR, sop_uid, ts)
    raw = store._part10(event, MR, sop_uid, ts)  # type: ignore[arg-type]
    assert raw == event.encoded_dataset(include_meta=True)
    assert raw[store._dataset_offset(raw) :] == event.dataset


def _written(tmp_path: Path, ts: str) -> tuple[Path, bytes]:
    big_endian = ts == ExplicitVRBigEndian
    (path,) = write_series(
        simple_head((1, 16, 16)),
        (1.0, 1.0, 1.0),
        tmp_path / ts,
        SeriesSpec(
            transfer_syntax=ExplicitVRLittleEndian if big_endian else ts, patient_name="ÄRZTIN^JÖRG"
        ),
    )
    if big_endian:  # the series writer does not write big endian: re-encode its file
        ds = dcmread(path)
        for _ in ds:  # decode every element before re-encoding it
            pass
        ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
        dcmwrite(path, ds, implicit_vr=False, little_endian=False, force_encoding=True)
    return path, path.read_bytes()


@pytest.mark.parametrize(
    "ts",
    [
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        ExplicitVRBigEndian,
        DeflatedExplicitVRLittleEndian,
    ],
)
def test_dataset_reads_as_dcmread_reads_it(tmp_path: Path, ts: str) -> None:
    path, raw = _written(tmp_path, ts)
    fast = store._parse(raw, ts)
    slow = dcmread(io.BytesIO(raw), specific_tags=list(store._NEEDED))
    assert [e.keyword for e in fast] == [e.keyword for e in slow]
    for keyword in store._NEEDED:
        assert fast.get(keyword) == slow.get(keyword), keyword
    assert str(fast.PatientName) == "ÄRZTIN^JÖRG"
    assert len(fast.PixelData) == 16 * 16 * 2


def test_a_stream_that_is_no_dataset_is_refused(tmp_path: Path) -> None:
    _, raw = _written(tmp_path, ExplicitVRLittleEndian)
    offset = store._dataset_offset(raw)
    garbage = raw[:offset] + bytes(range(256)) * 16
    with pytest.raises(store.Refused) as refused:
        store._parse(garbage, ExplicitVRLittleEndian)
    assert refused.value.status == store.CANNOT_UNDERSTAND
