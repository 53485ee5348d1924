"""The HTTP side: DICOMweb (PS3.18), the JSON APIs and the bundled viewer, on Starlette."""
