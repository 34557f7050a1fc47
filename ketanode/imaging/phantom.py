"""A simple synthetic head: nested ellipsoids with T1-like contrast.

Enough for the demo and the ingest tests; the measurement issue grows this into a
phantom built from the MNI152 maps with known regional volumes.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

# T1-weighted intensities (arbitrary units)
FAT, BONE, CSF, GM, WM = 900.0, 80.0, 150.0, 500.0, 750.0


def simple_head(
    shape: tuple[int, int, int] = (128, 128, 128), seed: int = 0, noise: float = 20.0
) -> NDArray[np.float32]:
    """A head volume ``[slice, row, col]``: scalp, skull, CSF, grey and white matter."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape]
    z, y, x = np.meshgrid(*axes, indexing="ij")

    def ellipsoid(scale: float) -> NDArray[np.bool_]:
        return (x / (0.80 * scale)) ** 2 + (y / (0.92 * scale)) ** 2 + (
            z / (0.85 * scale)
        ) ** 2 <= 1

    vol = np.zeros(shape, dtype=np.float32)
    vol[ellipsoid(1.00)] = FAT
    vol[ellipsoid(0.93)] = BONE
    vol[ellipsoid(0.87)] = CSF
    vol[ellipsoid(0.83)] = GM
    vol[ellipsoid(0.68)] = WM
    ventricles = ((x / 0.12) ** 2 + (y / 0.30) ** 2 + (z / 0.18) ** 2) <= 1
    vol[ventricles] = CSF
    vol += rng.normal(0.0, noise, size=shape).astype(np.float32)
    return np.clip(vol, 0, None)
