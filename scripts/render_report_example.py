"""Render docs/report-image.png (and the SR and report image as DICOM) from a realistic case.

A 1.5 mm phantom goes through the measurement steps (N4, registration, segmentation,
measurement, QC; about 40 s), the atlas territories are pulled into its native grid, the
bundled synthetic demonstration model predicts, and the two DICOM objects are built::

    python scripts/render_report_example.py [--out DIR] [--png docs/report-image.png]

With ``--not-scored``, the page of a series that quality control stopped instead: the GE
test object of ../shared/data (not a head) is converted and measured by ``analyse``, which
stops it with its reason (docs/report-image-not-scored.png).

With ``--real-head``, the page of the real head of ../shared/data (UIH uMR 770, 3 T, 0.5 x
0.5 x 1 mm sagittal, whole head with neck and shoulders): the series is converted by the
node's converter, measured by ``analyse`` (about 50 s), scored by the node's shipped
demonstration model and drawn (docs/report-image-real-head.png). A model whose feature spec
differs from the pipeline's is refused with its reason, and nothing is written.

Both shared-data pages draw what the node draws: the bias-corrected head on the working
grid cropped to its brain mask when preprocessing ran (else the converted image), the GM
map and the territory map when the steps that make them ran.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import pydicom

import ketanode
from ketanode.config import PipelineSettings
from ketanode.imaging.analysis import step_measure, step_preprocess, step_qc, step_segment
from ketanode.imaging.atlas import region_names_of_default_atlas
from ketanode.model.classifier import predict
from ketanode.model.files import DEMO_MODEL, load_model
from ketanode.report.content import ResultForReport
from ketanode.report.secondary_capture import build_report_image, write_png
from ketanode.report.sr import build_sr
from ketanode.synthetic.phantom import PhantomSpec, make_phantom

REPO = Path(__file__).resolve().parents[1]
SHARED_DICOM = REPO.parent / "shared" / "data" / "dicom"
GE_DIR = SHARED_DICOM / "ge-mp-rage-3t"
UIH_DIR = SHARED_DICOM / "uih-t1-3d-sag"


def scored_result(meas: dict[str, Any], qc: dict[str, Any], **images: Any) -> ResultForReport:
    """The shipped demonstration model's prediction on one measurement, as the report shows
    it (``ModelRefused``, with its reason, when the model's feature spec is not the
    pipeline's)."""
    loaded = load_model(DEMO_MODEL)
    pred = predict(loaded.model, [meas["vector"]])[0]
    return ResultForReport(
        predicted_class=pred["predicted_class"],
        probability=pred["probability"],
        decision_value=pred["decision_value"],
        contributions=pred["contributions"],
        volumes=dict(zip(meas["names"], meas["vector"], strict=True)),
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
        region_names=region_names_of_default_atlas(),
        **images,
    )


def write_objects(files: list[Path], result: ResultForReport, out: Path, png: Path) -> None:
    source = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    build_sr(source, result).save_as(out / "sr.dcm", enforce_file_format=True)
    sc = build_report_image(source, result)
    sc.save_as(out / "report.dcm", enforce_file_format=True)
    write_png(sc, png)
    what = (
        f"{result.predicted_class}, p {result.probability:.2f}"
        if result.scored
        else result.not_scored_reason
    )
    print(f"wrote {out / 'sr.dcm'}, {out / 'report.dcm'} and {png} ({what})")


def shared_series(folder: Path, out: Path, png: Path) -> None:
    """One series of ../shared/data through the converter and ``analyse``, then its page:
    scored by the demonstration model, or not scored with the QC failure's reason."""
    from ketanode.imaging.analysis import analyse
    from ketanode.imaging.convert import convert_series
    from ketanode.imaging.features import default_spec
    from ketanode.model.files import ModelRefused

    shutil.rmtree(out, ignore_errors=True)  # no file of an earlier run may be drawn
    out.mkdir(parents=True)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    t1 = Path(convert_series(files, out / "t1.nii.gz").path)
    analysed = analyse(t1, out)
    seconds, qc = sum(analysed["seconds"].values()), analysed["qc"]["outcome"]
    print(f"{folder.name}: {len(files)} files, analysed in {seconds:.0f} s, QC {qc}")
    # as the node's report: the preprocess step's bias-corrected head on the working grid
    # and its brain mask when that step finished (it writes t1_n4 last), else the converted
    # image; the segment step's GM map and the measure step's territories when they ran
    images: dict[str, Any] = {"t1_path": t1}
    if (out / "t1_n4.nii.gz").is_file():
        images |= {"t1_path": out / "t1_n4.nii.gz", "brain_mask_path": out / "brain_mask.nii.gz"}
    if (out / "gm_prob.nii.gz").is_file():
        images["gm_path"] = out / "gm_prob.nii.gz"
    if "error" in analysed:  # stopped by QC: the not-scored page
        spec = default_spec()
        result = ResultForReport(
            contributions={},
            volumes={},
            qc_outcome="fail",
            qc_checks=analysed["qc"]["checks"],
            model_synthetic=False,
            feature_spec_name=spec.name,
            feature_spec_sha256=spec.sha256,
            software_version=ketanode.__version__,
            not_scored_reason=analysed["error"],
            **images,
        )
    else:
        meas = analysed["features"]
        images["territories_path"] = Path(meas["territories_path"])
        try:
            result = scored_result(meas, analysed["qc"], **images)
        except ModelRefused as exc:
            raise SystemExit(f"{exc}; nothing written") from exc
    write_objects(files, result, out, png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/ketanode-report-example"))
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--not-scored", action="store_true", help="the page of a QC-failed series")
    ap.add_argument(
        "--real-head", action="store_true", help="the page of the real head of ../shared/data"
    )
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.real_head:
        png = args.png or REPO / "docs" / "report-image-real-head.png"
        shared_series(UIH_DIR, out / "real-head", png)
        return
    if args.not_scored:
        png = args.png or REPO / "docs" / "report-image-not-scored.png"
        shared_series(GE_DIR, out / "not-scored", png)
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
    result = scored_result(
        meas.as_dict(),
        qc.as_dict(),
        t1_path=Path(pre.n4_path),
        brain_mask_path=Path(pre.mask_path),
        gm_path=Path(seg.gm_path),
        territories_path=Path(meas.territories_path),  # the measure step's native map
    )
    write_objects(files, result, out, args.png)


if __name__ == "__main__":
    main()
