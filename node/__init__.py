"""cxr-node: a DICOM node that classifies chest radiographs and returns a DICOM SR."""

__version__ = "0.1.0"
