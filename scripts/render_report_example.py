"""Render docs/report-image.png (and the SR and report image as DICOM) from a realistic case.

A 1.5 mm phantom goes through the measurement steps (N4, registration, segmentation,
measurement, QC; about 40 s), the atlas territories are pulled into its native grid, the
bundled synthetic demonstration model predicts, and the two DICOM objects are built::

    python scripts/render_report_example.py [--out DIR] [--png docs/report-image.png]

With ``--not-scored``, the page of a series that quality control stopped instead: the GE
test object of ../shared/data (not a head) is converted, bias-corrected and registered, and
fails the registration check (docs/report-image-not-scored.png).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pydicom

import ketanode
from ketanode.config import PipelineSettings
from ketanode.dicom.report_content import ResultForReport
from ketanode.dicom.report_image import (
    build_report_image,
    region_names_of_default_atlas,
    write_png,
)
from ketanode.dicom.sr import build_sr
from ketanode.imaging.analysis import step_measure, step_preprocess, step_qc, step_segment
from ketanode.imaging.phantom import PhantomSpec, make_phantom
from ketanode.model.classifier import predict
from ketanode.model.files import load_model

REPO = Path(__file__).resolve().parents[1]


GE_DIR = REPO.parent / "shared" / "data" / "dicom" / "ge-mp-rage-3t"


def not_scored(out: Path, png: Path) -> None:
    from ketanode.dicom.report_content import RESEARCH_USE_ONLY  # noqa: F401 (documentation)
    from ketanode.imaging.analysis import step_preprocess, step_qc_input
    from ketanode.imaging.convert import convert_series
    from ketanode.imaging.features import default_spec
    from ketanode.imaging.preprocess import Registration
    from ketanode.imaging.qc import QCFailed, registration_checks

    files = sorted(p for p in GE_DIR.iterdir() if p.is_file() and p.suffix != ".txt")
    files = [f for f in files if not f.name.upper().startswith(("LICENSE", "README"))]
    t1 = convert_series(files, out / "t1.nii.gz").path
    p = PipelineSettings()
    step_qc_input(t1, p.qc)
    pre = step_preprocess(t1, out, p)
    checks = registration_checks(pre["n4_path"], Registration.from_dict(pre["registration"]), p.qc)
    reason = str(QCFailed(checks))
    spec = default_spec()
    result = ResultForReport(
        predicted_class=None,
        probability=None,
        decision_value=None,
        contributions={},
        volumes={},
        qc_outcome="fail",
        qc_checks=[c.as_dict() for c in checks],
        model_synthetic=False,
        feature_spec_name=spec.name,
        feature_spec_sha256=spec.sha256,
        software_version=ketanode.__version__,
        not_scored_reason=reason,
        t1_path=Path(pre["n4_path"]),
    )
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    sc = build_report_image(source, result)
    write_png(sc, png)
    print(f"wrote {png} ({reason})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/ketanode-report-example"))
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--not-scored", action="store_true", help="the page of a QC-failed series")
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.not_scored:
        not_scored(out, args.png or REPO / "docs" / "report-image-not-scored.png")
        return
    args.png = args.png or REPO / "docs" / "report-image.png"

    phantom = make_phantom(PhantomSpec(seed=args.seed, voxel_mm=(1.5, 1.5, 1.5)))
    files = phantom.write_dicom(out / "dicom")
    t1 = phantom.write_nifti(out / "t1.nii.gz")
    p = PipelineSettings()
    pre = step_preprocess(t1, out, p)
    seg = step_segment(pre, out, p)
    meas = step_measure(pre, seg)
    qc = step_qc(t1, pre, seg, meas, p.qc, False)
    terr = Path(meas["territories_path"])  # the measure step's native territory map

    loaded = load_model(REPO / "ketanode" / "data" / "models" / "demo.skops")
    pred = predict(loaded.model, [meas["vector"]])[0]
    volumes = dict(zip(meas["names"], meas["vector"], strict=True))
    result = ResultForReport(
        predicted_class=pred["predicted_class"],
        probability=pred["probability"],
        decision_value=pred["decision_value"],
        contributions=pred["contributions"],
        volumes=volumes,
        qc_outcome=qc["outcome"],
        qc_checks=qc["checks"],
        model_name=str(loaded.metadata.get("name", loaded.path.stem)),
        model_version=str(loaded.metadata.get("version") or loaded.metadata["created_at"][:10]),
        model_sha256=loaded.sha256,
        model_synthetic=loaded.synthetic,
        model_label=loaded.label,
        feature_spec_name=meas["spec"]["name"],
        feature_spec_sha256=meas["spec"]["sha256"],
        software_version=ketanode.__version__,
        t1_path=Path(pre["n4_path"]),
        gm_path=Path(seg["gm_path"]),
        territories_path=terr,
        region_names=region_names_of_default_atlas(),
    )
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    build_sr(source, result).save_as(out / "sr.dcm", enforce_file_format=True)
    sc = build_report_image(source, result)
    sc.save_as(out / "report.dcm", enforce_file_format=True)
    write_png(sc, args.png)
    print(f"wrote {out / 'sr.dcm'}, {out / 'report.dcm'} and {args.png}")


if __name__ == "__main__":
    main()
