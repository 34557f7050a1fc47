"""Model files: skops (never pickle) plus JSON metadata beside it, and the refusal rules.

``NAME.skops`` holds the fitted calibrated pipeline (:mod:`ketanode.model.classifier`);
``NAME.json`` holds the metadata: feature spec (name, version, SHA-256), library versions,
training cohort summary, cross-validated metrics, intended use ("research use only"), the
synthetic flag and label, creation time, and the SHA-256 of the ``.skops`` file.

:func:`load_model` refuses, with a :class:`ModelRefused` whose message names the reason:

- ``not_skops``: the file is not a skops archive (a pickle file is named as such, checked
  first from its first bytes: pickle can run arbitrary code when loaded, so it is never
  unpickled);
- ``no_metadata``: the JSON beside it is missing or unreadable;
- ``sha256_mismatch``: the file's SHA-256 differs from the metadata's (changed or replaced);
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

from ketanode import RESEARCH_USE_ONLY, __version__
from ketanode.imaging.features import FeatureSpec, default_spec
from ketanode.model.classifier import TIV_DESCRIPTION, TrainedModel

logger = logging.getLogger(__name__)

FORMAT = "ketanode-model"
FORMAT_VERSION = 1
INTENDED_USE = (
    "Research use only. Estimates the chance of response (MADRS drop >= 50 % at 24 h) to one "
    "IV ketamine infusion in treatment-resistant depression from regional grey-matter "
    "volumes of a structural 3D T1 MRI. Not for clinical decisions."
)
DEMO_LABEL = "DEMONSTRATION MODEL trained on synthetic data - not a clinical prediction"

#: The types a ketanode model archive may hold beyond skops' own defaults (builtins, numpy
#: arrays), checked before loading and passed to ``skops.io.load``.
TRUSTED_TYPES: tuple[str, ...] = (
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
    metadata: dict[str, Any]
    sha256: str
    path: Path

    @property
    def synthetic(self) -> bool:
        return bool(self.metadata.get("synthetic"))

    @property
    def label(self) -> str:
        """What to show next to any output of this model."""
        text = str(self.metadata.get("label") or "")
        return text or (DEMO_LABEL if self.synthetic else RESEARCH_USE_ONLY)


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
            "calibration": "CalibratedClassifierCV(method=sigmoid, ensemble=False): one SVC "
            "on all training subjects, Platt sigmoid on held-out fold decision values",
            "inputs": list(model.inputs),
            "tiv": model.tiv,
            "tiv_handling": TIV_DESCRIPTION.get(model.tiv, model.tiv),
            "C": model.C,
            "positive_class": "responder",
            "class_rule": "responder when the SVC decision value >= 0",
            "weights": {k: round(v, 6) for k, v in model.weights().items()},
        },
        "libraries": library_versions(),
        "training_cohort": cohort,
        "validation": validation,
        **(extra or {}),
    }


def save_model(model: TrainedModel, path: str | Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """Write ``path`` (skops) and its metadata JSON; returns the metadata with the SHA-256."""
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
    os.replace(tmp, target)
    meta = dict(metadata) | {"file": target.name, "sha256": file_sha256(target)}
    mtmp = metadata_path(target).with_name(f".{os.getpid()}.{target.stem}.json")
    mtmp.write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    os.replace(mtmp, metadata_path(target))
    logger.info("model written: %s (sha256 %s)", target.name, meta["sha256"][:12])
    return meta


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


def load_model(path: str | Path, spec: FeatureSpec | None = None) -> LoadedModel:
    """Check and load a model file (see the module docstring for the refusal rules)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no model file {p}")
    _refuse_pickle(p)  # before anything else reads it
    meta = read_metadata(p)
    sha = file_sha256(p)
    if sha != meta.get("sha256"):
        raise ModelRefused(
            "sha256_mismatch",
            f"refused {p}: SHA-256 mismatch: the file's is {sha}, the metadata records "
            f"{meta.get('sha256')} (the file was changed or replaced)",
        )
    _check_skops(p)
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
    model = TrainedModel(
        estimator=estimator,
        feature_names=list(tiv_step.feature_names),
        inputs=list(tiv_step.inputs),
        tiv=str(tiv_step.mode),
        C=float(pipe.named_steps["svc"].C),
    )
    logger.info("model loaded: %s (sha256 %s)", p.name, sha[:12])
    return LoadedModel(model, meta, sha, p)
