"""An open-source DICOM archive: DIMSE and DICOMweb over one catalog, with an AI loop."""

__version__ = "0.1.0"
