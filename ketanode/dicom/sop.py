"""SOP classes and transfer syntaxes the listener accepts."""

from __future__ import annotations

from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AllStoragePresentationContexts

from ketanode.config import ENHANCED_MR_IMAGE_STORAGE, MR_IMAGE_STORAGE

#: The SOP classes the node processes; other storage classes are acknowledged and recorded.
PROCESSED_SOP_CLASSES = frozenset({MR_IMAGE_STORAGE, ENHANCED_MR_IMAGE_STORAGE})

ACCEPTED_TRANSFER_SYNTAXES: list[UID] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
]

#: Every storage SOP class pynetdicom knows (a whole-study push brings many).
STORAGE_SOP_CLASSES: list[str] = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
