"""What comes in: the DICOM listener, its associations, the store handler, series completion and
selection.
"""
