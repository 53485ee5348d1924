"""Pure DICOM logic: the attribute table, queries, matching, the JSON model. No I/O here."""
