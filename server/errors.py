"""The server's exception tree.

::

    ServerError
    ├── ConfigError          bad ae_config/*.toml or environment value (carries file and line)
    ├── IngestError          an instance was refused; carries the DIMSE status (PS3.4 B.2.3)
    │   ├── InvalidDataset   cannot be parsed, or a required UID is missing/malformed
    │   └── DatasetMismatch  the dataset does not match its SOP Class / request
    ├── StorageError         the file could not be written durably (out of resources)
    └── QueryError           a query identifier or parameter is invalid; carries the status
"""

from __future__ import annotations


class ServerError(Exception):
    """Base class of every error the server raises on purpose."""


class ConfigError(ServerError):
    """A configuration file or setting is invalid.

    ``location`` is ``path:line`` when the offending line is known, so start-up can point at it.
    """

    def __init__(self, message: str, location: str | None = None) -> None:
        self.location = location
        super().__init__(f"{location}: {message}" if location else message)


class IngestError(ServerError):
    """An instance could not be stored; ``status`` is the C-STORE failure status."""

    status: int = 0x0110  # Processing failure (PS3.7 C.4)

    def __init__(self, message: str, status: int | None = None) -> None:
        if status is not None:
            self.status = status
        super().__init__(message)


class InvalidDataset(IngestError):
    """Cannot understand: unparseable data, or UIDs that are missing or malformed (0xC000)."""

    status = 0xC000


class DatasetMismatch(IngestError):
    """Data Set does not match SOP Class (0xA900, PS3.4 Table B.2-1)."""

    status = 0xA900


class StorageError(IngestError):
    """Refused: out of resources (0xA700), e.g. the disk is full or not writable."""

    status = 0xA700


class QueryError(ServerError):
    """An invalid query; ``status`` is the C-FIND failure status (0xA900 for a bad identifier)."""

    def __init__(self, message: str, status: int = 0xA900) -> None:
        self.status = status
        super().__init__(message)
