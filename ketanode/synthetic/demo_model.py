"""The demonstration model's recipe: a seeded synthetic cohort, the node's pipeline, training.

``ketanode model demo-train`` (or ``python scripts/make_demo_model.py``) runs it:

1. :data:`DEMO_COHORT`: 64 phantoms, half responders, planted effect d = 1.5 (frontal GM up
   in responders, cerebellar GM up in non-responders), region_sd 0.08, two simulated
   sites (different SNR), 2 mm isotropic voxels, seed 2026.
2. Features by the node's default pipeline settings, cached.
3. :data:`DEMO_PROTOCOL`: 10 x 5-fold nested CV (inner 5-fold over C), 100 permutations,
   seed 2026, TIV as proportion; final model fitted on all subjects, its probability
   calibrated with the sigmoid anchored at the cohort's response rate (threshold 0.5).
4. Written to ``ketanode/data/models/demo.skops`` (metadata sealed inside) + ``demo.json``
   + ``demo.report.html``, with ``synthetic: true`` and the label
   :data:`ketanode.texts.DEMO_LABEL`. A new file's SHA-256 and ``estimator_sha256``
   must then be added to :data:`ketanode.model.files.KNOWN_SYNTHETIC` (kept with the old
   ones), so that the code knows it as synthetic whatever its metadata says.

ANTs registration is not bit-reproducible across runs/threads, so features (and so the
model's SHA-256) can differ in the last digits between runs; the recipe, seeds, cohort and
protocol are fixed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ketanode.config import PipelineSettings
from ketanode.model.cohort import extract_features, read_cohort
from ketanode.model.files import DEMO_MODEL as DEMO_MODEL  # where the recipe writes it
from ketanode.model.training import train
from ketanode.model.validation import Protocol
from ketanode.synthetic.cohort import SyntheticCohort, write_cohort
from ketanode.texts import DEMO_LABEL

DEMO_SEED = 2026
DEMO_COHORT = SyntheticCohort(
    n=64, responder_rate=0.5, effect_d=1.5, seed=DEMO_SEED, voxel_mm=2.0, sites=2
)
DEMO_PROTOCOL = Protocol(
    folds=5, repeats=10, inner_folds=5, seed=DEMO_SEED, n_permutations=100, n_jobs=2
)
COMMAND = "ketanode model demo-train --work ketanode-data/demo-cohort --jobs 2"


def held_out_cohort(voxel_mm: float = 1.0) -> SyntheticCohort:
    """Subjects the demonstration model never saw (another seed), e.g. for end-to-end tests:
    ``held_out_cohort().phantom_spec(index, group)`` with group 1 (responder-like) or 0."""
    return SyntheticCohort(
        n=DEMO_COHORT.n,
        effect_d=DEMO_COHORT.effect_d,
        seed=DEMO_SEED + 1,
        voxel_mm=voxel_mm,
        region_sd=DEMO_COHORT.region_sd,
        sites=1,
    )


def make_demo_model(
    work: str | Path,
    out: str | Path = DEMO_MODEL,
    n_jobs: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Regenerate the demonstration model (see the module docstring)."""
    work = Path(work)
    say = progress or (lambda _m: None)
    say(f"writing the synthetic cohort ({DEMO_COHORT.n} phantoms) to {work / 'cohort'}")
    csv_path = write_cohort(DEMO_COHORT, work / "cohort", n_jobs=n_jobs)
    settings = PipelineSettings()
    say("measuring features with the node's default pipeline settings")
    table = extract_features(
        read_cohort(csv_path), settings=settings, cache_dir=work / "feature-cache", n_jobs=n_jobs
    )
    protocol = Protocol(**{**DEMO_PROTOCOL.__dict__, "n_jobs": n_jobs})
    return train(
        table,
        out,
        protocol=protocol,
        name="ketanode-demo",
        synthetic=True,
        label=DEMO_LABEL,
        extra_metadata={
            "recipe": {
                "command": COMMAND,
                "synthetic_cohort": DEMO_COHORT.as_dict(),
                "pipeline_settings": {
                    "registration": settings.registration,
                    "registration_resolution_mm": settings.registration_resolution_mm,
                    "prior_weight": settings.prior_weight,
                },
                "excluded": table.excluded,
            }
        },
        progress=say,
    )
