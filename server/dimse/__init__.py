"""The DICOM Application Entity (pynetdicom): C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET."""
