"""C-MOVE/C-GET sub-operations that send stored files without decoding them.

pynetdicom's retrieve service wants a Dataset per sub-operation and re-encodes it: a full
``dcmread`` plus ``write_dataset`` of every instance.  Handlers yield a :class:`StoredFile`
instead, a Dataset carrying only the two UIDs pynetdicom looks at and the file's path; the
wrapped ``Association.send_c_store`` streams the file's bytes as stored (pynetdicom's chunked
send, PS3.7 9.1.1) when the peer accepted the stored transfer syntax, and falls back to decoding
(so pynetdicom may convert between uncompressed syntaxes) when it did not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import _config
from pynetdicom.association import Association


class StoredFile(Dataset):
    def __init__(self, path: Path, sop_class_uid: str, sop_instance_uid: str, syntax: str) -> None:
        super().__init__()
        self.SOPClassUID = sop_class_uid
        self.SOPInstanceUID = sop_instance_uid
        self._stored_path = path
        self._stored_syntax = syntax


_original_send_c_store = Association.send_c_store


def _send_c_store(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(dataset, StoredFile):
        try:
            self._get_valid_context(
                dataset.SOPClassUID, dataset._stored_syntax, "scu", allow_conversion=False
            )
            return _original_send_c_store(self, dataset._stored_path, *args, **kwargs)
        except ValueError:
            dataset = dcmread(dataset._stored_path)
    return _original_send_c_store(self, dataset, *args, **kwargs)


def install() -> None:
    # Only file paths take the chunked route; Datasets are sent as before.
    _config.STORE_SEND_CHUNKED_DATASET = True
    Association.send_c_store = _send_c_store  # type: ignore[method-assign]
