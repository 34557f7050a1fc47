"""ketanode: a DICOM node that scores structural 3D T1 MRI. Research use only."""

__version__ = "0.1.0"
