"""The structural 3D T1 rules: each rule can reject, with its reason."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ketanode.config import ENHANCED_MR_IMAGE_STORAGE, MR_IMAGE_STORAGE, SelectionRules
from ketanode.receive.selection import SeriesView, decide

RULES = SelectionRules()

T1 = SeriesView(
    modality="MR",
    sop_class_uid=MR_IMAGE_STORAGE,
    description="3D Ax T1 MP-RAGE_R22",
    protocol_name="Brain Advanced Sequences",
    image_type="ORIGINAL\\PRIMARY\\OTHER",
    mr_acquisition_type="3D",
    pixel_spacing_row=0.9375,
    pixel_spacing_col=0.9375,
    slice_thickness=1.2,
    spacing_between_slices=1.2,
    n_instances=130,
    n_frames=130,
)


def test_ge_mprage_is_selected() -> None:
    decision = decide(T1, RULES)
    assert decision.selected, decision.reason
    assert decision.reason.startswith("structural 3D T1")
    assert all(c["ok"] for c in decision.checks)


@pytest.mark.parametrize(
    "description",
    [
        "t1_mprage_sag_p2_iso",
        "Sag 3D BRAVO",
        "T1W_3D_TFE",
        "MPRAGE",
        "FSPGR BRAVO",
        "t1_mp2rage_UNI",
    ],
)
def test_t1_names_are_recognised(description: str) -> None:
    assert decide(replace(T1, description=description, protocol_name=None), RULES).selected


@pytest.mark.parametrize(
    ("change", "rule", "words"),
    [
        ({"modality": "CT"}, "modality", "modality CT"),
        ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.7"}, "sop_class", "SOP class"),
        ({"mr_acquisition_type": "2D", "n_instances": 3, "n_frames": 3}, "volume", "3 slices"),
        ({"slice_thickness": 5.0, "spacing_between_slices": 5.0}, "voxel_size", "<= 1.5 mm"),
        ({"pixel_spacing_row": None}, "voxel_size", "must be known"),
        ({"image_type": "DERIVED\\SECONDARY\\MPR"}, "image_type", "DERIVED"),
        ({"image_type": "ORIGINAL\\PRIMARY\\LOCALIZER"}, "image_type", "LOCALIZER"),
        ({"description": "ep2d_diff DWI", "protocol_name": "ep2d_diff"}, "exclude_pattern", "diff"),
        ({"description": "t2_flair_sag", "protocol_name": None}, "exclude_pattern", "t2"),
        ({"description": "Sag T1 FLAIR", "protocol_name": None}, "exclude_pattern", "flair"),
        ({"description": "AX T1 POST GAD", "protocol_name": None}, "exclude_pattern", "post"),
        ({"description": "3D CISS", "protocol_name": None}, "include_pattern", "no T1 pattern"),
        ({"description": None, "protocol_name": None}, "include_pattern", "no T1 pattern"),
    ],
)
def test_each_rule_rejects_with_reason(change: dict[str, object], rule: str, words: str) -> None:
    decision = decide(replace(T1, **change), RULES)  # type: ignore[arg-type]
    assert not decision.selected
    failed = [c for c in decision.checks if not c["ok"]]
    assert rule in [c["rule"] for c in failed]
    assert decision.reason.startswith("not a structural 3D T1")
    assert words.lower() in " ".join(c["detail"] for c in failed).lower()


def test_many_2d_slices_count_as_a_volume_but_few_do_not() -> None:
    assert decide(replace(T1, mr_acquisition_type="2D", n_instances=176), RULES).selected
    assert not decide(replace(T1, mr_acquisition_type="2D", n_instances=60), RULES).selected


def test_enhanced_mr_counts_frames() -> None:
    enhanced = replace(
        T1,
        sop_class_uid=ENHANCED_MR_IMAGE_STORAGE,
        n_instances=1,
        n_frames=176,
        mr_acquisition_type=None,
    )
    assert decide(enhanced, RULES).selected


def test_rules_are_configurable() -> None:
    strict = RULES.model_copy(update={"max_voxel_mm": 1.0})
    assert not decide(T1, strict).selected
    loose = RULES.model_copy(update={"include_pattern": "ciss", "exclude_pattern": "^$"})
    assert decide(replace(T1, description="3D CISS", protocol_name=None), loose).selected
