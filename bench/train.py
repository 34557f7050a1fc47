"""Wall time of training on 100 subjects' cached features (issue 4 goal: < 60 s).

Training = what ``ketanode model train`` does after feature extraction: repeated stratified
nested CV (10 x 5-fold, inner 5-fold over C) with bootstrap CIs, the permutation test (100
permutations), the final calibrated model, the skops file and the HTML report.

    python bench/train.py                           # 100 feature-level synthetic subjects
    python bench/train.py --cohort C.csv --cache D  # a cohort whose features are cached

With ``--cohort``, reading the cached features is timed as its own stage (no subject may
need computing: the bench fails if one does). Prints one JSON line per stage and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ketanode.imaging.features import default_spec  # noqa: E402
from ketanode.model.cohort import FeatureTable, extract_features, read_cohort  # noqa: E402
from ketanode.model.training import train  # noqa: E402
from ketanode.model.validation import Protocol  # noqa: E402
from ketanode.synthetic.cohort import SyntheticCohort, feature_cohort  # noqa: E402

GOAL_S = 60.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--cohort", type=Path, help="cohort CSV whose features are cached")
    parser.add_argument("--cache", type=Path, help="feature cache folder of --cohort")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--permutations", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    t0 = time.perf_counter()
    if args.cohort:
        table = extract_features(
            read_cohort(args.cohort), cache_dir=args.cache, n_jobs=args.jobs, progress=False
        )
        if table.computed:
            print(json.dumps({"bench": "train", "error": f"{table.computed} not cached"}))
            return 1
        source = f"cached features of {args.cohort}"
    else:
        X, y, _ = feature_cohort(SyntheticCohort(n=args.subjects, seed=args.seed))
        table = FeatureTable(
            spec=default_spec(),
            subjects=[f"s{i}" for i in range(len(y))],
            X=X,
            y=y,
            sites=[None] * len(y),
        )
        source = "feature-level synthetic cohort (planted effect d=1.5)"
    t_features = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "bench": "train",
                "stage": "features",
                "source": source,
                "subjects": len(table.y),
                "seconds": round(t_features, 2),
            }
        ),
        flush=True,
    )
    protocol = Protocol(
        repeats=args.repeats, n_permutations=args.permutations, n_jobs=args.jobs, seed=args.seed
    )
    with tempfile.TemporaryDirectory(prefix="ketanode-bench-train-") as tmp:
        t1 = time.perf_counter()
        meta = train(table, Path(tmp) / "bench.skops", protocol=protocol, synthetic=True)
        t_train = time.perf_counter() - t1
    val = meta["validation"]
    print(
        json.dumps(
            {
                "bench": "train",
                "stage": "nested_cv+permutations",
                "seconds": meta["seconds"]["nested_cv"],
            }
        ),
        flush=True,
    )
    total = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "bench": "train",
                "summary": True,
                "subjects": len(table.y),
                "cpus": os.cpu_count(),
                "jobs": args.jobs,
                "repeats": args.repeats,
                "permutations": args.permutations,
                "train_s": round(t_train, 2),
                "total_s": round(total, 2),
                "goal_s": GOAL_S,
                "ok": total < GOAL_S,
                "balanced_accuracy": val["metrics"]["balanced_accuracy"],
                "permutation_p": (val["permutation"] or {}).get("p_value"),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
