"""Treatment-arm analysis of a fixed model: metrics per arm and the arm x prediction
interaction, the study's test of specificity (a model of ketamine response should predict
response in the ketamine arm and not in the saline arm).

Interaction: logistic regression of the observed response on arm (0/1), the model's
predicted class (0/1) and their product,
``logit P(response) = b0 + b1 arm + b2 predicted + b3 arm x predicted``; ``b3`` is the
difference between the arms in how much the prediction tells about response (a log odds
ratio). Its p-value is a likelihood-ratio test (1 df) against the model without the product
(:mod:`ketanode.model.stats`), which, unlike a Wald test, stays valid when the prediction
separates response perfectly in one arm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ketanode.model.stats import likelihood_ratio_test, logistic_fit


def interaction(
    y: NDArray[Any], pred: NDArray[Any], arms: Sequence[str], coded_one: str
) -> dict[str, Any]:
    """Arm x predicted-class interaction (see the module docstring)."""
    yy = np.asarray(y, dtype=float)
    p = np.asarray(pred, dtype=float)
    a = np.array([1.0 if x == coded_one else 0.0 for x in arms])
    ones = np.ones(len(yy))
    full = logistic_fit(np.column_stack([ones, a, p, a * p]), yy)
    reduced = logistic_fit(np.column_stack([ones, a, p]), yy)
    p_value = likelihood_ratio_test(full, reduced)
    return {
        "model": "logit P(response) = b0 + b1 arm + b2 predicted + b3 arm x predicted",
        "arm_coded_1": coded_one,
        "coefficients": {
            k: round(float(v), 4)
            for k, v in zip(
                ("b0", "b1_arm", "b2_predicted", "b3_interaction"), full.coef, strict=True
            )
        },
        "test": "likelihood-ratio test of b3 (1 df)",
        "lr_statistic": round(max(0.0, 2 * (full.loglik - reduced.loglik)), 4),
        "p_value": float(f"{p_value:.3g}"),
        "separation": full.separation,
        "n": int(len(yy)),
    }


def reference_arm(names: Sequence[str]) -> str:
    """The arm coded 1: ``ketamine`` when present, else the first in sorted order."""
    return "ketamine" if "ketamine" in names else sorted(names)[0]
