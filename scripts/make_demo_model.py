"""Regenerate the demonstration model shipped in ketanode/data/models/ (seeded recipe).

    python scripts/make_demo_model.py [--work ketanode-data/demo-cohort] [--jobs 2]

Same as ``ketanode model demo-train``; the recipe is ketanode/synthetic/demo_model.py and the
README next to the model says how it was made.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ketanode.synthetic.demo_model import DEMO_MODEL, make_demo_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("ketanode-data/demo-cohort"))
    parser.add_argument("--out", type=Path, default=DEMO_MODEL)
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    meta = make_demo_model(args.work, args.out, n_jobs=args.jobs, progress=print)
    print(json.dumps({
        "model": str(args.out), "sha256": meta["sha256"], "label": meta["label"],
        "seconds": meta["seconds"], "metrics": meta["validation"]["metrics"],
        "permutation": meta["validation"]["permutation"],
        "leave_site_out": meta["validation"]["leave_site_out"],
    }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
