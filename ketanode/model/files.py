"""Model files: skops (never pickle) with the metadata sealed inside, a readable copy beside.

``NAME.skops`` holds the fitted calibrated pipeline (:mod:`ketanode.model.classifier`) and,
as one more member of its zip archive (:data:`METADATA_MEMBER`), the metadata: feature spec
(name, version, SHA-256), library versions, training cohort summary, cross-validated
metrics, the decision rule (threshold, margin, training response rate), intended use
("research use only"), the synthetic flag and label, creation time, and the SHA-256 of the
estimator's own members (``estimator_sha256``). The model's SHA-256 (the file's, the
registry's key) therefore covers the metadata too: a changed flag is another file. ``NAME.json``
beside it is a readable copy plus the file's SHA-256; where the copy differs from the sealed
metadata it is ignored (logged, and listed in :attr:`LoadedModel.ignored_metadata`).

Synthetic whatever the metadata says: the shipped demonstration model is known to the code
by its file SHA-256 and its estimator's (:data:`KNOWN_SYNTHETIC`), so a copy rewritten with
``"synthetic": false`` (beside or sealed) is still a demonstration model; the registry's
stored flag is added at prediction (:func:`ketanode.model.registry.load_active`).

:func:`load_model` refuses, with a :class:`ModelRefused` whose message names the reason:

- ``not_skops``: the file is not a skops archive (a pickle file is named as such, checked
  first from its first bytes: pickle can run arbitrary code when loaded, so it is never
  unpickled);
- ``no_metadata``: the JSON beside it is missing or unreadable;
- ``unsealed_metadata``: no metadata sealed inside the file (format 1, before issue 12: its
  flags could be edited; retrain it);
- ``sha256_mismatch``: the file's SHA-256 differs from the one recorded beside it (changed or
  replaced);
- ``metadata_mismatch``: the sealed metadata does not describe the estimator in the file
  (its ``estimator_sha256`` or decision threshold differ: the archive was rebuilt);
- ``spec_mismatch``: the model's feature spec hash differs from the pipeline's;
- ``untrusted_types``: the archive holds types outside :data:`TRUSTED_TYPES`.

Loading uses ``skops.io.load`` with that explicit trusted-types list.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import platform
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import sklearn
import skops
import skops.io as sio
from sklearn.calibration import CalibratedClassifierCV

from ketanode import __version__
from ketanode.imaging.features import FeatureSpec, default_spec
from ketanode.model.classifier import (
    DECISION_RULE_TEXT,
    INDETERMINATE_MARGIN,
    TIV_DESCRIPTION,
    TrainedModel,
    decision_threshold,
)
from ketanode.texts import DEMO_LABEL, RESEARCH_USE_ONLY

logger = logging.getLogger(__name__)

FORMAT = "ketanode-model"
FORMAT_VERSION = 2
#: The zip member of a ``.skops`` file that holds the sealed metadata.
METADATA_MEMBER = "ketanode-metadata.json"
#: The models shipped in the package, and the demonstration model among them (its recipe is
#: :mod:`ketanode.synthetic.demo_model`; the node loads the file, never the recipe).
PACKAGE_MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
DEMO_MODEL = PACKAGE_MODELS / "demo.skops"
#: Models that are synthetic whatever their metadata says: SHA-256 of the file or of its
#: estimator members (:func:`estimator_sha256`) -> what it is. Every shipped demonstration
#: model is listed (a retrained one is added, never replaces its predecessor).
KNOWN_SYNTHETIC: dict[str, str] = {
    # demo.skops of 2026-12-02 (feature spec v2; format 1: metadata beside, not sealed):
    # the file, and its estimator (the same estimator is sealed in the format 2 file)
    "b4e3c5aa2ea0ee8d4e7ca7de844b27913265116ba901351bdec557e747f281d8": "demonstration model",
    "ea3cff189ad71ddec3473a53ea4835ca431c1faef750d1bb3b7e2cab7e03904b": "demonstration model",
    # the same estimator with its metadata sealed (format 2, issue 12)
    "9e58266775512691ec0ecd19ae387c8f1c400b18777369cc1a17fd42833aaa43": "demonstration model",
}
INTENDED_USE = (
    "Research use only. Estimates the chance of response (MADRS drop >= 50 % at 24 h) to one "
    "IV ketamine infusion in treatment-resistant depression from regional grey-matter "
    "volumes of a structural 3D T1 MRI. Not for clinical decisions."
)

#: The types a ketanode model archive may hold beyond skops' own defaults (builtins, numpy
#: arrays), checked before loading and passed to ``skops.io.load``.
TRUSTED_TYPES: tuple[str, ...] = (
    "ketanode.model.classifier.PriorAnchoredCalibratedCV",
    "ketanode.model.classifier.TIVAdjust",
    "sklearn.calibration.CalibratedClassifierCV",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.svm._classes.SVC",
)


class ModelRefused(Exception):
    """A model file the node will not use; ``reason`` is a short code, the message says why."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class LoadedModel:
    model: TrainedModel
    metadata: dict[str, Any]  # the sealed metadata (the copy beside the file is not used)
    sha256: str
    path: Path
    estimator_sha256: str = ""
    #: why the model counts as synthetic beyond its own flag: "known demonstration model",
    #: "registry" (the registry's stored flag, see registry.load_active)
    synthetic_reasons: tuple[str, ...] = ()
    #: keys whose value in the JSON beside the file differs from the sealed metadata
    ignored_metadata: tuple[str, ...] = ()

    @property
    def synthetic(self) -> bool:
        return bool(self.metadata.get("synthetic")) or bool(self.synthetic_reasons)

    @property
    def label(self) -> str:
        """What to show next to any output of this model (a synthetic model's label always
        says so, whatever its metadata's label)."""
        text = str(self.metadata.get("label") or "").strip()
        if self.synthetic:
            return text if "synthetic" in text.lower() else DEMO_LABEL
        return text or RESEARCH_USE_ONLY

    @property
    def training_response_rate(self) -> float | None:
        """The training cohort's fraction of responders (the probability depends on it)."""
        rule = self.metadata.get("decision_rule") or {}
        if rule.get("training_response_rate") is not None:
            return float(rule["training_response_rate"])
        return response_rate(self.metadata.get("training_cohort") or {})

    def decision_rule(self) -> dict[str, Any]:
        """Threshold, margin and the training response rate, as outputs state them."""
        return {
            "threshold": round(self.model.threshold, 6),
            "margin": self.model.margin,
            "training_response_rate": self.training_response_rate,
        }


def response_rate(cohort: dict[str, Any]) -> float | None:
    """Responders / subjects of a cohort summary (``responders``, ``n``), if it has them."""
    try:
        n, r = int(cohort["n"]), int(cohort["responders"])
    except (KeyError, TypeError, ValueError):
        return None
    return round(r / n, 6) if n > 0 else None


def known_synthetic(*hashes: str) -> str | None:
    """What a known synthetic model is, when one of its hashes is listed."""
    for h in hashes:
        if h in KNOWN_SYNTHETIC:
            return KNOWN_SYNTHETIC[h]
    return None


def metadata_path(path: str | Path) -> Path:
    return Path(path).with_suffix(".json")


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    return {
        "ketanode": __version__,
        "python": platform.python_version(),
        "scikit-learn": sklearn.__version__,
        "skops": skops.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }


def make_metadata(
    model: TrainedModel,
    *,
    name: str,
    cohort: dict[str, Any],
    validation: dict[str, Any] | None,
    synthetic: bool,
    spec: FeatureSpec | None = None,
    label: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metadata of a new model (the file's SHA-256 is added by :func:`save_model`)."""
    spec = spec or default_spec()
    rule = model.decision_rule(response_rate(cohort))
    if not rule["same_as_svc_sign"]:
        logger.warning(
            "the calibrated probability does not rise with the decision value (sigmoid slope "
            "%s): the class follows the probability, against the SVC's sign",
            rule["sigmoid_slope"],
        )
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name,
        "label": label or (DEMO_LABEL if synthetic else RESEARCH_USE_ONLY),
        "synthetic": synthetic,
        "intended_use": INTENDED_USE,
        "research_use_only": True,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "feature_spec": {**spec.as_dict(), "atlas": spec.atlas, "features": list(spec.features)},
        "classifier": {
            "pipeline": "TIVAdjust -> StandardScaler -> SVC(kernel=linear, class_weight=balanced)",
            "calibration": "PriorAnchoredCalibratedCV (CalibratedClassifierCV, method=sigmoid, "
            "ensemble=False): one SVC on all training subjects, Platt sigmoid on held-out fold "
            "decision values, its intercept fixed so that P at decision value 0 is the "
            "training cohort's response rate",
            "inputs": list(model.inputs),
            "tiv": model.tiv,
            "tiv_handling": TIV_DESCRIPTION.get(model.tiv, model.tiv),
            "C": model.C,
            "positive_class": "responder",
            "class_rule": DECISION_RULE_TEXT,
            "weights": {k: round(v, 6) for k, v in model.weights().items()},
        },
        "decision_rule": rule,
        "libraries": library_versions(),
        "training_cohort": cohort,
        "validation": validation,
        **(extra or {}),
    }


def _member_bytes(zf: zipfile.ZipFile) -> list[tuple[str, bytes]]:
    return [(n, zf.read(n)) for n in sorted(zf.namelist()) if n != METADATA_MEMBER]


def estimator_sha256(path: str | Path) -> str:
    """SHA-256 of a skops archive's members other than the sealed metadata (the estimator
    itself: the same for an archive rebuilt with other metadata)."""
    h = hashlib.sha256()
    with zipfile.ZipFile(path) as zf:
        for name, data in _member_bytes(zf):
            h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def read_sealed(path: str | Path) -> dict[str, Any] | None:
    """The metadata sealed inside a ``.skops`` file, or None when it has none."""
    with zipfile.ZipFile(path) as zf:
        if METADATA_MEMBER not in zf.namelist():
            return None
        meta = json.loads(zf.read(METADATA_MEMBER))
    return meta if isinstance(meta, dict) else None


def seal(path: str | Path, metadata: dict[str, Any]) -> None:
    """Add ``metadata`` to the archive at ``path`` (once; fixed member date, so the same
    estimator and metadata give the same bytes)."""
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        if METADATA_MEMBER in zf.namelist():
            raise ValueError(f"{path} already holds sealed metadata")
        info = zipfile.ZipInfo(METADATA_MEMBER, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, json.dumps(metadata, indent=1, sort_keys=True))


def save_model(model: TrainedModel, path: str | Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Write ``path`` (skops, the metadata sealed inside) and the readable copy beside it;
    returns the metadata with the file's SHA-256."""
    target = Path(path)
    if target.suffix != ".skops":
        raise ValueError(f"model files end in .skops: {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{os.getpid()}.{target.name}")
    sio.dump(model.estimator, tmp)
    untrusted = set(sio.get_untrusted_types(file=tmp)) - set(TRUSTED_TYPES)
    if untrusted:
        tmp.unlink()
        raise RuntimeError(f"model holds types outside TRUSTED_TYPES: {sorted(untrusted)}")
    est_sha = estimator_sha256(tmp)
    sealed = {k: v for k, v in metadata.items() if k not in ("file", "sha256")}
    sealed |= {"format_version": FORMAT_VERSION, "estimator_sha256": est_sha}
    if known_synthetic(est_sha):
        sealed |= {"synthetic": True, "label": DEMO_LABEL}
    seal(tmp, sealed)
    os.replace(tmp, target)
    meta = sealed | {"file": target.name, "sha256": file_sha256(target)}
    mtmp = metadata_path(target).with_name(f".{os.getpid()}.{target.stem}.json")
    mtmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    os.replace(mtmp, metadata_path(target))
    logger.info("model written: %s (sha256 %s)", target.name, meta["sha256"][:12])
    return meta


def seal_legacy(path: str | Path) -> dict[str, Any]:
    """Seal the metadata of a format 1 model (metadata beside the file only) inside it.

    The file's SHA-256 must match the JSON beside it; the estimator members are kept byte
    for byte (same ``estimator_sha256``), the decision rule is added. What the JSON says is
    what gets sealed, except that a known synthetic model stays synthetic. Returns the new
    metadata (with the new file SHA-256)."""
    p = Path(path)
    _refuse_pickle(p)
    _check_skops(p)
    beside = read_metadata(p)
    if file_sha256(p) != beside.get("sha256"):
        raise ModelRefused("sha256_mismatch", f"refused {p}: SHA-256 mismatch")
    if read_sealed(p) is not None:
        raise ValueError(f"{p} already holds sealed metadata")
    untrusted = set(sio.get_untrusted_types(file=p)) - set(TRUSTED_TYPES)
    if untrusted:
        raise ModelRefused("untrusted_types", f"refused {p}: untrusted types {sorted(untrusted)}")
    estimator = sio.load(p, trusted=list(TRUSTED_TYPES))
    pipe = estimator.calibrated_classifiers_[0].estimator
    tiv_step = pipe.named_steps["tiv"]
    model = TrainedModel(
        estimator,
        list(tiv_step.feature_names),
        list(tiv_step.inputs),
        str(tiv_step.mode),
        float(pipe.named_steps["svc"].C),
    )
    est_sha = estimator_sha256(p)
    meta = {k: v for k, v in beside.items() if k not in ("file", "sha256")}
    meta["classifier"] = dict(meta.get("classifier") or {}) | {"class_rule": DECISION_RULE_TEXT}
    meta |= {
        "format_version": FORMAT_VERSION,
        "estimator_sha256": est_sha,
        "decision_rule": model.decision_rule(response_rate(meta.get("training_cohort") or {})),
    }
    if known_synthetic(file_sha256(p), est_sha):
        meta |= {"synthetic": True, "label": DEMO_LABEL}
    tmp = p.with_name(f".{os.getpid()}.{p.name}")
    tmp.write_bytes(p.read_bytes())
    seal(tmp, meta)
    os.replace(tmp, p)
    out = meta | {"file": p.name, "sha256": file_sha256(p)}
    metadata_path(p).write_text(json.dumps(out, indent=2, sort_keys=False) + "\n")
    logger.info("model sealed: %s (sha256 %s)", p.name, out["sha256"][:12])
    return out


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:1] == b"\x80" or head[:1] in (b"(", b"c", b"]", b"}"):
        raise ModelRefused(
            "not_skops",
            f"refused {path}: it is a pickle file, not skops (pickle can run arbitrary code "
            "when loaded; ketanode loads skops model files only)",
        )


def _check_skops(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        raise ModelRefused("not_skops", f"refused {path}: not a skops model file")
    with zipfile.ZipFile(path) as zf:
        if "schema.json" not in zf.namelist():
            raise ModelRefused("not_skops", f"refused {path}: a zip file but not a skops file")


def read_metadata(path: str | Path) -> dict[str, Any]:
    mpath = metadata_path(path)
    try:
        meta = json.loads(mpath.read_text())
    except FileNotFoundError as exc:
        raise ModelRefused("no_metadata", f"refused {path}: no metadata file {mpath}") from exc
    except (OSError, ValueError) as exc:
        raise ModelRefused("no_metadata", f"refused {path}: unreadable metadata: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelRefused("no_metadata", f"refused {path}: {mpath} is not ketanode metadata")
    return meta


def _spec_difference(model_spec: dict[str, Any], spec: FeatureSpec) -> str:
    """What differs between a model's feature spec and the pipeline's, in words."""
    parts = []
    for key in ("name", "version", "atlas"):
        theirs, ours = model_spec.get(key), getattr(spec, key)
        if theirs is not None and str(theirs) != str(ours):
            parts.append(f"{key} {theirs!r} != {ours!r}")
    features = model_spec.get("features")
    if isinstance(features, list) and features != list(spec.features):
        missing = [f for f in spec.features if f not in features]
        extra = [f for f in features if f not in spec.features]
        parts.append(
            f"features: missing {missing}, extra {extra}"
            if missing or extra
            else "features in another order"
        )
    return ": " + "; ".join(parts) if parts else ""


def _compare_beside(p: Path, sealed: dict[str, Any], beside: dict[str, Any]) -> tuple[str, ...]:
    keys = (set(sealed) | set(beside)) - {"file", "sha256"}
    differ = tuple(sorted(k for k in keys if sealed.get(k) != beside.get(k)))
    if differ:
        logger.warning(
            "model %s: the metadata beside it differs from the sealed metadata in %s: ignored",
            p.name,
            ", ".join(differ),
        )
    return differ


def load_model(path: str | Path, spec: FeatureSpec | None = None) -> LoadedModel:
    """Check and load a model file (see the module docstring for the refusal rules)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no model file {p}")
    _refuse_pickle(p)  # before anything else reads it
    beside = read_metadata(p)
    sha = file_sha256(p)
    if sha != beside.get("sha256"):
        raise ModelRefused(
            "sha256_mismatch",
            f"refused {p}: SHA-256 mismatch: the file's is {sha}, the metadata records "
            f"{beside.get('sha256')} (the file was changed or replaced)",
        )
    _check_skops(p)
    try:
        meta = read_sealed(p)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ModelRefused("no_metadata", f"refused {p}: unreadable sealed metadata") from exc
    est_sha = estimator_sha256(p)
    known = known_synthetic(sha, est_sha)
    if meta is None or meta.get("format") != FORMAT:
        raise ModelRefused(
            "unsealed_metadata",
            f"refused {p}: its metadata is not sealed inside the model file (format 1: the "
            "synthetic flag and label could be edited); retrain it with this version"
            + (f" ({known})" if known else ""),
        )
    if meta.get("estimator_sha256") != est_sha:
        raise ModelRefused(
            "metadata_mismatch",
            f"refused {p}: the sealed metadata describes another estimator "
            f"({str(meta.get('estimator_sha256'))[:12]}, the file holds {est_sha[:12]})",
        )
    ignored = _compare_beside(p, meta, beside)
    spec = spec or default_spec()
    model_spec = meta.get("feature_spec") or {}
    if model_spec.get("sha256") != spec.sha256:
        raise ModelRefused(
            "spec_mismatch",
            f"refused {p}: feature spec mismatch: the model was trained on "
            f"{model_spec.get('name')} v{model_spec.get('version')} "
            f"({str(model_spec.get('sha256'))[:12]}), this pipeline emits {spec.name} "
            f"v{spec.version} ({spec.sha256[:12]}){_spec_difference(model_spec, spec)}",
        )
    untrusted = set(sio.get_untrusted_types(file=p)) - set(TRUSTED_TYPES)
    if untrusted:
        raise ModelRefused(
            "untrusted_types", f"refused {p}: it holds untrusted types {sorted(untrusted)}"
        )
    estimator = sio.load(p, trusted=list(TRUSTED_TYPES))
    if not isinstance(estimator, CalibratedClassifierCV):
        raise ModelRefused("not_skops", f"refused {p}: not a ketanode classifier")
    pipe = estimator.calibrated_classifiers_[0].estimator
    tiv_step = pipe.named_steps["tiv"]
    if list(tiv_step.feature_names) != list(spec.features):
        raise ModelRefused("spec_mismatch", f"refused {p}: its feature names differ from the spec")
    rule = meta.get("decision_rule") or {}
    try:
        threshold = decision_threshold(estimator)
        margin = float(rule.get("margin", INDETERMINATE_MARGIN))
        recorded = float(rule["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelRefused("metadata_mismatch", f"refused {p}: no usable decision rule") from exc
    if abs(recorded - threshold) > 1e-5 or not 0 <= margin < 0.5:
        raise ModelRefused(
            "metadata_mismatch",
            f"refused {p}: the recorded decision rule (threshold {recorded}, margin {margin}) "
            f"does not fit the estimator (threshold {threshold:.6f})",
        )
    model = TrainedModel(
        estimator=estimator,
        feature_names=list(tiv_step.feature_names),
        inputs=list(tiv_step.inputs),
        tiv=str(tiv_step.mode),
        C=float(pipe.named_steps["svc"].C),
        margin=margin,
    )
    reasons = (f"known {known}",) if known else ()
    logger.info(
        "model loaded: %s (sha256 %s)%s", p.name, sha[:12], " - synthetic" if reasons else ""
    )
    return LoadedModel(model, meta, sha, p, est_sha, reasons, ignored)
