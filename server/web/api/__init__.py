"""The JSON APIs (shared/spec/): the worklist API now, the workstation API next."""
