"""ICC(3,1) of bench/repeatability.py against Shrout & Fleiss (1979), Table 2."""

from __future__ import annotations

import importlib.util
import math
from types import ModuleType

import numpy as np
import pytest

from tests.support import REPO

# Shrout & Fleiss (1979), Table 2: 6 targets (rows) rated by 4 judges (columns)
SF_TABLE_2 = [
    [9, 2, 5, 8],
    [6, 1, 3, 2],
    [8, 4, 6, 8],
    [7, 1, 2, 6],
    [10, 5, 6, 9],
    [6, 2, 4, 7],
]


def _bench() -> ModuleType:
    # bench/ is not a package: load the script by path
    spec = importlib.util.spec_from_file_location(
        "bench_repeatability", REPO / "bench" / "repeatability.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_icc_matches_shrout_fleiss_table_2() -> None:
    # published ICC(3,1) = 0.71 for all four judges
    assert round(_bench().icc_3_1(SF_TABLE_2), 2) == 0.71


def test_icc_two_judges_by_hand() -> None:
    # judges 1 and 4: row means 8.5 4 8 6.5 9.5 6.5, grand mean 43/6;
    # MS_rows = 2 * (113/6) / 5 = 113/15; differences 1 4 0 1 1 -1 (mean 1),
    # MS_error = 14 / (2 * 5) = 21/15; ICC = (113 - 21) / (113 + 21) = 46/67
    table = np.array(SF_TABLE_2)[:, [0, 3]]
    assert math.isclose(_bench().icc_3_1(table), 46 / 67, rel_tol=1e-12)


def test_icc_is_consistency_not_absolute_agreement() -> None:
    icc = _bench().icc_3_1
    a = np.array([10.0, 12.0, 9.0, 15.0, 11.0])
    assert math.isclose(icc(np.c_[a, a]), 1.0)
    assert math.isclose(icc(np.c_[a, a + 3.0]), 1.0)  # a constant offset is ignored
    assert math.isclose(icc(np.c_[a, 30.0 - a]), -1.0)  # perfectly reversed order


def test_icc_rejects_a_table_too_small() -> None:
    icc = _bench().icc_3_1
    with pytest.raises(ValueError):
        icc([[1.0, 2.0]])
    with pytest.raises(ValueError):
        icc([[1.0], [2.0]])
