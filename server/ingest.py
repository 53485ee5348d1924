"""The one ingest path: C-STORE, STOW-RS, uploads, ``import`` and AI results all call
:meth:`Ingestor.ingest`.

Order of work (ARCHITECTURE.md, "Commit, then announce"): parse the header only (pixel data is
never decoded here), validate the UIDs, write the file durably, commit the catalog rows in one
transaction, and only then report success, so an acknowledged instance survives a crash.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from peewee import DatabaseError
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
)

from server import metrics
from server.catalog import writer
from server.catalog.db import session
from server.catalog.schema import ci_column
from server.dicom import json as dicom_json
from server.dicom.attributes import INTEGER_VRS, Level, extracted
from server.dicom.header import read_header
from server.dicom.uids import is_valid_uid
from server.dicom.validate import problems
from server.errors import DatasetMismatch, IngestError, InvalidDataset
from server.storage import Storage, storage_key

log = logging.getLogger(__name__)

Outcome = Literal["stored", "duplicate", "replaced"]
_REQUIRED_UIDS = (
    ("SOPClassUID", "00080016"),
    ("SOPInstanceUID", "00080018"),
    ("StudyInstanceUID", "0020000D"),
    ("SeriesInstanceUID", "0020000E"),
)


@dataclass(frozen=True)
class IngestResult:
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    outcome: Outcome
    transfer_syntax_uid: str
    accession_number: str = ""
    warnings: tuple[str, ...] = ()  # conformance problems (server/dicom/validate.py)


Listener = Callable[[IngestResult], None]
# Work that follows a commit and that the sender need not wait for: see Ingestor.ingest(later=).
Later = list[Callable[[], None]]


def run_later(later: Later) -> None:
    """Run (and empty) what :meth:`Ingestor.ingest` left in ``later``; a failure is logged,
    never raised: the instance it follows is stored and acknowledged."""
    while later:
        work = later.pop(0)
        try:
            work()
        except Exception:
            log.exception("work after an acknowledged instance failed")


def _integer(text: str) -> int | None:
    try:
        number = int(float(text))
    except (ValueError, OverflowError):
        return None
    # IS holds 32-bit values (PS3.5 6.2); a bigger one would fail the catalog insert
    return number if -(2**31) <= number < 2**31 else None


COLUMN_CHARS = 256  # at most 1 KiB in UTF-8: within PostgreSQL's B-tree entry limit


@functools.cache
def _column_specs(level: Level) -> tuple[tuple[str, str, bool, str | None], ...]:
    """(tag, column, integer?, case-insensitive column of a PN) of ``level``'s attributes."""
    return tuple(
        (a.tag_hex, a.column, a.vr in INTEGER_VRS, ci_column(a) if a.vr == "PN" else None)
        for a in extracted(level)
    )


def extract_columns(metadata: dict[str, Any], level: Level) -> dict[str, Any]:
    """Catalog column values of ``level`` (the attribute table drives it), read from the
    instance's DICOM JSON so each value is converted once."""
    values: dict[str, Any] = {}
    for tag, column, integer, ci in _column_specs(level):
        element = metadata.get(tag)
        if not element:
            values[column] = None
            if ci:
                values[ci] = None
            continue
        # NUL is padding or garbage, and PostgreSQL text cannot hold it; a value far beyond any
        # VR's length cannot be indexed there (found by tools/fuzz.py: both refused the
        # instance with 0xA700 on PostgreSQL only). The metadata keeps the values as sent.
        texts = [t.replace("\0", "").strip(" ") for t in dicom_json.text_values(element)]
        if integer:
            # an unparseable optional value is not a reason to refuse the instance
            values[column] = _integer(texts[0]) if texts and texts[0] else None
            continue
        text = "\\".join(texts)[:COLUMN_CHARS] if any(texts) else None
        values[column] = text
        if ci:
            values[ci] = text.upper() if text else None
    return values


# Objects that are about images rather than images: their referenced series are not sources.
_NON_IMAGE_CLASSES_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.")
_SEGMENTATION_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _items(metadata: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    value = (metadata.get(tag) or {}).get("Value") or []
    return [item for item in value if isinstance(item, dict)]


def source_series(metadata: dict[str, Any]) -> str | None:
    """The image series a derived object (SEG, SR, ...) was made from, if it says so.

    A SEG names it in the Common Instance Reference module's Referenced Series Sequence
    (PS3.3 C.12.2); an SR in its evidence (Current Requested Procedure Evidence Sequence,
    PS3.3 C.17.2.3), which may also list the SEG it measured, so the first series whose
    instances are images wins.
    """
    candidates = _items(metadata, "00081115")
    for evidence in _items(metadata, "0040A375"):
        candidates.extend(_items(evidence, "00081115"))
    for series in candidates:
        uid = dicom_json.text_values(series.get("0020000E"))
        classes = [
            c
            for item in _items(series, "00081199")
            for c in dicom_json.text_values(item.get("00081150"))
        ]
        if not uid or not uid[0]:
            continue
        if classes and all(
            c == _SEGMENTATION_CLASS or c.startswith(_NON_IMAGE_CLASSES_PREFIXES) for c in classes
        ):
            continue
        return uid[0].strip(" \0")
    return None


_PIXEL_DATA_LE = b"\xe0\x7f\x10\x00"
_SEQUENCE_END_LE = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNCHECKED_SYNTAXES = ("1.2.840.10008.1.2.2", str(DeflatedExplicitVRLittleEndian))
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


def _check_pixel_data(data: bytes, at: int, syntax: str) -> None:
    """Refuse a file whose Pixel Data is cut short (the header parse stops before it, at
    ``at``): acknowledging it would keep an image that cannot be shown (found by
    tools/fuzz.py: truncated instances were stored with success)."""
    if data[at : at + 4] != _PIXEL_DATA_LE or syntax in _UNCHECKED_SYNTAXES:
        return  # no pixel data, or an encoding where positions cannot be checked this way
    if syntax == "1.2.840.10008.1.2":  # implicit VR
        header, length = 8, int.from_bytes(data[at + 4 : at + 8], "little")
    elif data[at + 4 : at + 6] in _LONG_VRS:
        header, length = 12, int.from_bytes(data[at + 8 : at + 12], "little")
    else:
        header, length = 8, int.from_bytes(data[at + 6 : at + 8], "little")
    if length == 0xFFFFFFFF:
        if data.rfind(_SEQUENCE_END_LE, at) < 0:
            raise InvalidDataset("Pixel Data is cut short: no sequence delimiter")
    elif at + header + length > len(data):
        got = max(0, len(data) - at - header)
        raise InvalidDataset(f"Pixel Data is cut short: {got} of {length} bytes")


@dataclass(frozen=True)
class _Parsed:
    header: dict[str, Any]  # DICOM JSON of the data set (no file meta, no pixel data)
    transfer_syntax: str
    encoded: bytes  # what is stored: the Part 10 file


def _json_of(ds: Dataset) -> dict[str, Any]:
    try:
        return dicom_json.to_json(ds)
    except Exception as exc:  # e.g. nesting too deep, a number beyond 64 bits
        raise InvalidDataset(f"cannot read the header: {exc}") from exc


def _parse(data: bytes) -> _Parsed:
    """Header-only parse (pixel data is never decoded) of Part 10 bytes or a bare data set."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        fast = read_header(data)
        if fast is not None:
            _check_pixel_data(data, fast.pixel_at, fast.transfer_syntax)
            return _Parsed(fast.json, fast.transfer_syntax, data)
        stream = io.BytesIO(data)
        try:
            ds = dcmread(stream, stop_before_pixels=True)
        except Exception as exc:  # pydicom's errors on malformed data are of many types
            raise InvalidDataset(f"cannot parse DICOM data: {exc}") from exc
        if "TransferSyntaxUID" not in ds.file_meta:
            raise InvalidDataset("file meta information lacks (0002,0010) TransferSyntaxUID")
        syntax = str(ds.file_meta.TransferSyntaxUID)
        _check_pixel_data(data, stream.tell(), syntax)
        _check_readable(ds)
        return _Parsed(_json_of(ds), syntax, data)
    # A bare dataset without the Part 10 header (some tools write these): wrap it.
    try:
        ds = dcmread(io.BytesIO(data), force=True)
        if len(ds) == 0 or "SOPInstanceUID" not in ds:
            raise InvalidDataset("not DICOM data (no Part 10 header and no SOP Instance UID)")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "")
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = (
            ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) else None
        ) or ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        _check_readable(ds)
        out = io.BytesIO()
        dcmwrite(out, ds, enforce_file_format=True)
    except InvalidDataset:
        raise
    except Exception as exc:
        raise InvalidDataset(f"cannot parse DICOM data: {exc}") from exc
    return _Parsed(_json_of(ds), str(meta.TransferSyntaxUID), out.getvalue())


def _check_readable(ds: Dataset) -> None:
    """The identifying UIDs must convert as pydicom reads them: the JSON keeps whatever can be
    read of a broken element (an unknown VR, a bad length), which is no basis for an
    identity (found by tools/fuzz.py)."""
    for keyword, _ in _REQUIRED_UIDS:
        try:
            ds.get(keyword)
        except Exception as exc:  # read lazily: a bad VR or length shows up only here
            raise InvalidDataset(f"{keyword} cannot be read: {exc}") from exc


def _single_text(header: dict[str, Any], tag: str) -> str:
    return "\\".join(dicom_json.text_values(header.get(tag)))


def _validate(
    header: dict[str, Any], expect_class: str | None, expect_instance: str | None
) -> dict[str, str]:
    uids: dict[str, str] = {}
    for keyword, tag in _REQUIRED_UIDS:
        value = _single_text(header, tag).strip(" \0")
        if not value:
            # PS3.4 B.2.3: a dataset lacking a required attribute does not match its SOP Class.
            raise DatasetMismatch(f"dataset lacks {keyword}")
        if not is_valid_uid(value):
            raise InvalidDataset(f"{keyword} is not a valid UID: {value[:40]!r}")
        uids[keyword] = value
    # Error Comments are cut at 64 characters (LO), so the reason comes before the values.
    if expect_class and uids["SOPClassUID"] != expect_class:
        raise DatasetMismatch(
            f"SOPClassUID does not match the presentation context: "
            f"{uids['SOPClassUID']} vs {expect_class}"
        )
    if expect_instance and uids["SOPInstanceUID"] != expect_instance:
        raise DatasetMismatch(
            f"SOPInstanceUID does not match the request: "
            f"{uids['SOPInstanceUID']} vs {expect_instance}"
        )
    return uids


class Ingestor:
    """Stores instances: the single entry point for every way data arrives."""

    def __init__(self, storage: Storage, *, duplicates: str = "ignore") -> None:
        self.storage = storage
        self.replace = duplicates == "replace"
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` after each instance is committed (never before)."""
        with self._lock:
            self._listeners.append(listener)

    def ingest(
        self,
        data: bytes,
        *,
        source: str,
        expect_sop_class: str | None = None,
        expect_sop_instance: str | None = None,
        expect_study: str | None = None,
        institution: str | None = None,
        later: Later | None = None,
    ) -> IngestResult:
        """Store one instance given as Part 10 bytes (or a bare dataset).

        Raises an :class:`~server.errors.IngestError` carrying the DIMSE status on failure.

        With ``later``, what follows the commit (removing the write's journal entry, the
        listeners) is appended there instead of done, for a caller that answers its sender
        first and then calls :func:`run_later`: the C-STORE SCP, whose sender waits for each
        response before it sends the next instance.  The instance is durable and catalogued
        either way; a crash before that work only leaves the journal entry for recovery.
        """
        try:
            done = self._ingest(
                data,
                source=source,
                expect_sop_class=expect_sop_class,
                expect_sop_instance=expect_sop_instance,
                expect_study=expect_study,
                institution=institution,
                later=later,
            )
        except Exception:
            metrics.ingested(source, "failed", len(data))
            raise
        metrics.ingested(source, done.outcome, len(data))
        return done

    def _ingest(
        self,
        data: bytes,
        *,
        source: str,
        expect_sop_class: str | None,
        expect_sop_instance: str | None,
        expect_study: str | None,
        institution: str | None,
        later: Later | None,
    ) -> IngestResult:
        parsed = _parse(data)
        header = parsed.header
        uids = _validate(header, expect_sop_class, expect_sop_instance)
        if expect_study and uids["StudyInstanceUID"] != expect_study:
            # PS3.18 10.5.1.2: a STOW-RS to /studies/{uid} stores only instances of that study.
            raise DatasetMismatch(
                f"StudyInstanceUID does not match the request: "
                f"{uids['StudyInstanceUID']} vs {expect_study}"
            )
        sop_uid = uids["SOPInstanceUID"]
        transfer_syntax = parsed.transfer_syntax

        def result(outcome: Outcome, warnings: tuple[str, ...] = ()) -> IngestResult:
            return IngestResult(
                uids["SOPClassUID"],
                sop_uid,
                uids["StudyInstanceUID"],
                uids["SeriesInstanceUID"],
                outcome,
                transfer_syntax,
                _single_text(header, "00080050").strip(),
                warnings,
            )

        with session():
            if not self.replace and writer.is_catalogued(sop_uid):
                return result("duplicate")
            key = storage_key(sop_uid)
            try:
                warnings = tuple(problems(header, has_pixels=False))
                metadata = dicom_json.dumps(header).decode()
            except Exception as exc:  # e.g. nesting too deep, a number beyond 64 bits
                raise InvalidDataset(f"cannot read the header: {exc}") from exc
            staged = self.storage.stage(key, (parsed.encoded,))
            record = writer.InstanceRecord(
                patient=extract_columns(header, Level.PATIENT),
                study={**extract_columns(header, Level.STUDY), "institution": institution or None},
                series={
                    **extract_columns(header, Level.SERIES),
                    "source_series": source_series(header),
                },
                instance={
                    **extract_columns(header, Level.IMAGE),
                    "storage_key": key,
                    "file_path": staged.relative,
                    "file_size": staged.size,
                    "transfer_syntax_uid": transfer_syntax,
                    "metadata": metadata,
                    "source": source[:200],
                },
            )
            try:
                obsolete = writer.record_instance(record, replace=self.replace)
            except writer.DuplicateInstance:
                self.storage.finish(staged, keep=False)
                return result("duplicate")
            except DatabaseError as exc:
                self.storage.finish(staged, keep=False)
                raise IngestError(f"catalog unavailable: {exc}", 0xA700) from exc
            except BaseException:
                self.storage.finish(staged, keep=False)
                raise
            if later is None:
                self.storage.finish(staged, keep=True, obsolete=obsolete)
        done = result("replaced" if obsolete else "stored", warnings)
        if later is None:
            self._announce(done)
        else:
            later.append(lambda: self.storage.finish(staged, keep=True, obsolete=obsolete))
            later.append(lambda: self._announce(done))
        return done

    def _announce(self, done: IngestResult) -> None:
        for listener in list(self._listeners):
            try:
                listener(done)
            except Exception:  # a broken subscriber must not turn a stored instance into a failure
                log.exception("ingest listener failed")
