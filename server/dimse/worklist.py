"""Modality Worklist C-FIND SCP and Modality Performed Procedure Step SCP (issue #4).

Both serve the worklist items of ``server/worklist/service.py`` (the ones the REST API creates),
scoped to the calling AE's institution: ``institution`` of its ``[[peer]]`` in ``peers.toml``,
or ``[worklist] unknown_aes_institution`` for an AE not listed there.  An AE without an
institution sees no items and its MPPS touch none.

* **MWL C-FIND** (Modality Worklist Information Model - FIND, 1.2.840.10008.5.1.4.31,
  PS3.4 K.6.1): the items of the institution that are SCHEDULED or IN_PROGRESS (any status when
  the identifier matches on Scheduled Procedure Step Status) are narrowed in SQL by the
  single-valued keys and the SPS start date, then every key is matched in memory by the shared
  engine (:func:`server.dicom.query.parse_keys`, :func:`server.dicom.matching.matches_json`)
  against the item's MWL attributes (:func:`item_dataset`), sequence matching included
  (C.2.2.2.6).  Each response carries the requested keys only (K.2.2.1.2), requested sequence
  items with their requested sub-keys only, unknown keys empty; text is sent as UTF-8
  (ISO_IR 192) when it is not ASCII.
* **MPPS** (Modality Performed Procedure Step SOP Class, 1.2.840.10008.3.1.2.3.3, PS3.4 F.7):
  N-CREATE (status IN PROGRESS) finds the items its Scheduled Step Attributes Sequence names
  (Accession Number, else Study Instance UID) and moves them to IN_PROGRESS; N-SET to COMPLETED
  or DISCONTINUED moves them to COMPLETED or CANCELED.  Every MPPS is kept
  (:class:`~server.catalog.schema.MppsInstance`), one that names no item too.

Status codes (PS3.4 F.7.2, PS3.7 C.4):

=========  =============================================================================
0x0106     N-CREATE with Performed Procedure Step Status other than IN PROGRESS (F.7.2.1.2);
           N-SET with a status value that is not IN PROGRESS, COMPLETED or DISCONTINUED
0x0110     N-SET of an MPPS no longer IN PROGRESS: Error ID 0xA710, "Performed Procedure
           Step Object may no longer be updated" (F.7.2.2.2, Table F.7.2-2); a status change
           the worklist item's status does not allow (Error Comment says which)
0x0111     N-CREATE of an SOP Instance UID that exists (Duplicate SOP Instance)
0x0112     N-SET of an MPPS this AE's institution does not have (No Such SOP Instance)
0x0117     an Affected SOP Instance UID that is not a UID (Invalid Object Instance)
0x0120/21  N-CREATE without Performed Procedure Step Status, or with it empty
=========  =============================================================================
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterable, Iterator
from typing import Any, cast

from peewee import IntegrityError
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom.dimse_primitives import N_CREATE, N_SET
from pynetdicom.events import Event

from server.archive import Archive
from server.catalog.db import session, write_transaction
from server.catalog.schema import MppsInstance, WorklistItem
from server.dicom import json as dicom_json
from server.dicom.matching import matches_json
from server.dicom.query import Constraint, MatchKind, Term, parse_keys
from server.dicom.uids import is_valid_uid
from server.errors import QueryError
from server.worklist import service

log = logging.getLogger(__name__)

MWL_FIND = "1.2.840.10008.5.1.4.31"  # Modality Worklist Information Model - FIND
MPPS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


SPS_SEQUENCE = _tag("ScheduledProcedureStepSequence")
_SSA_SEQUENCE = _tag("ScheduledStepAttributesSequence")
_PPS_STATUS = _tag("PerformedProcedureStepStatus")
_CHARSET = _tag("SpecificCharacterSet")
_QR_LEVEL = _tag("QueryRetrieveLevel")
_SPS_STATUS_TAG = _tag("ScheduledProcedureStepStatus")

# The attributes of Table K.6-1 an item has (top level, and in its one SPS item): these are
# matched; keys outside them are optional keys we do not match on, so they are ignored for
# matching and answered empty (K.2.2.1.1.2).
_TOP_KEYWORDS = (
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "RequestedProcedureDescription",
    "RequestedProcedureID",
)
_SPS_KEYWORDS = (
    "Modality",
    "ScheduledStationAETitle",
    "ScheduledProcedureStepStartDate",
    "ScheduledProcedureStepStartTime",
    "ScheduledPerformingPhysicianName",
    "ScheduledProcedureStepDescription",
    "ScheduledProcedureStepID",
    "ScheduledProcedureStepLocation",
    "ScheduledProcedureStepStatus",
)
_TOP_KEYS = frozenset(_tag(k) for k in (*_TOP_KEYWORDS, "ScheduledProcedureStepSequence"))
_SPS_KEYS = frozenset(_tag(k) for k in _SPS_KEYWORDS)

# Our item status -> Scheduled Procedure Step Status (0040,0020), PS3.3 C.4.10 defined terms.
SPS_STATUS = {
    "SCHEDULED": "SCHEDULED",
    "IN_PROGRESS": "STARTED",
    "COMPLETED": "COMPLETED",
    "CANCELED": "CANCELED",
}
_ACTIVE = ("SCHEDULED", "IN_PROGRESS")
_MAX_CHARS = {"LO": 64, "SH": 16}  # PS3.5 6.2; longer REST values are cut for DICOM
_DA = re.compile(r"^\d{8}$")
_TM = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def institution_of(archive: Archive, calling_ae: str) -> str:
    """The worklist tenant of a calling AE ("" = none: it sees no items)."""
    return archive.settings.institution_of(calling_ae)


# -- the MWL attributes of an item --------------------------------------------------------------


def _put(ds: Dataset, keyword: str, value: str | None) -> None:
    if not value:
        return
    tag = _tag(keyword)
    vr = dictionary_VR(tag)
    limit = _MAX_CHARS.get(vr)
    text = value[:limit] if limit else value
    ds[tag] = DataElement(tag, vr, text, validation_mode=pydicom_config.IGNORE)


def _person_name(surname: str, forename: str, title: str | None) -> str:
    """PN components family^given^middle^prefix^suffix (PS3.5 6.2.1); the title is a prefix."""
    return f"{surname}^{forename}^^{title}" if title else f"{surname}^{forename}"


def item_dataset(item: Any) -> Dataset:
    """The Modality Worklist attributes of a worklist item (PS3.4 K.6.1.2.2, Table K.6-1).

    RequestedProcedureID and ScheduledProcedureStepID are Type 1 return keys: an item without
    ``procedure_id``/``procedure_step_id`` answers its accession number there.
    """
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    _put(ds, "AccessionNumber", item.accession_number)
    _put(ds, "ReferringPhysicianName", item.referring_physician)
    _put(ds, "InstitutionName", item.hospital_name)
    _put(ds, "PatientName", _person_name(item.surname, item.forename, item.title))
    _put(ds, "PatientID", item.patient_id)
    if item.date_of_birth:
        _put(ds, "PatientBirthDate", item.date_of_birth.replace("-", ""))
    _put(ds, "PatientSex", item.sex)
    _put(ds, "StudyInstanceUID", item.study_instance_uid)
    _put(ds, "RequestedProcedureDescription", item.exam_description)
    _put(ds, "RequestedProcedureID", item.procedure_id or item.accession_number)
    sps = Dataset()
    _put(sps, "Modality", item.modality)
    _put(sps, "ScheduledStationAETitle", item.scheduled_aet)
    when = str(item.exam_date_and_time)  # YYYY-MM-DD HH:MM:SS
    _put(sps, "ScheduledProcedureStepStartDate", when[:10].replace("-", ""))
    _put(sps, "ScheduledProcedureStepStartTime", when[11:19].replace(":", ""))
    _put(sps, "ScheduledPerformingPhysicianName", item.performing_physician)
    _put(sps, "ScheduledProcedureStepDescription", item.exam_description)
    _put(sps, "ScheduledProcedureStepID", item.procedure_step_id or item.accession_number)
    _put(sps, "ScheduledProcedureStepLocation", item.exam_room)
    _put(sps, "ScheduledProcedureStepStatus", SPS_STATUS.get(item.status, item.status))
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    return ds


# -- matching -----------------------------------------------------------------------------------


def _time_ceiling(value: str) -> str:
    """The last instant a TM value of this precision stands for (``1200`` -> ``120059.999999``),
    so ranges and single values of less precision than the stored time match it."""
    whole, _, fraction = value.partition(".")
    return (whole + "5959"[: max(0, 6 - len(whole))]) + "." + fraction.ljust(6, "9")


def _checked(c: Constraint) -> Constraint:
    """DA/TM values must be dates/times (0xA900 otherwise); TM values match by precision."""
    if c.vr not in ("DA", "TM"):
        return c
    pattern = _DA if c.vr == "DA" else _TM
    for term in c.terms:
        for value in (term.value, term.upper):
            if value and not pattern.match(value):
                raise QueryError(f"{c.keyword}: {value!r} is not a valid {c.vr} value")
    if c.vr == "DA":
        return c
    terms = []
    for term in c.terms:
        if term.kind is MatchKind.SINGLE:
            terms.append(Term(MatchKind.RANGE, term.value, _time_ceiling(term.value)))
        elif term.kind is MatchKind.RANGE and term.upper:
            terms.append(Term(MatchKind.RANGE, term.value, _time_ceiling(term.upper)))
        else:
            terms.append(term)
    return Constraint(c.tag, c.vr, tuple(terms))


def matching_constraints(keys: Iterable[Constraint]) -> tuple[list[Constraint], bool]:
    """The keys to match on, and whether some matching key was not supported (and ignored).

    A sequence key other than the Scheduled Procedure Step Sequence, or a key outside
    Table K.6-1's attributes of an item, is an optional key we do not match on (K.2.2.1.1.2).
    """
    kept: list[Constraint] = []
    ignored = False
    for c in keys:
        if c.universal:
            continue
        if c.tag not in _TOP_KEYS:
            ignored = True
            continue
        if c.tag != SPS_SEQUENCE:
            kept.append(_checked(c))
            continue
        if c.vr != "SQ" or c.terms[0].kind is not MatchKind.SEQUENCE:
            raise QueryError("ScheduledProcedureStepSequence must be a sequence")
        items: list[Constraint] = []
        for sub in c.terms[0].items:
            if sub.universal:
                continue
            if sub.tag in _SPS_KEYS:
                items.append(_checked(sub))
            else:
                ignored = True
        if items:
            kept.append(Constraint(c.tag, "SQ", (Term(MatchKind.SEQUENCE, items=tuple(items)),)))
    return kept, ignored


def _singles(c: Constraint | None) -> list[str] | None:
    """The values of a constraint made only of single values (SQL-able), else None."""
    if c is None or not c.terms or any(t.kind is not MatchKind.SINGLE for t in c.terms):
        return None
    return [t.value for t in c.terms]


def _date_sql(c: Constraint) -> Any:
    def day(value: str) -> str:
        return f"{value[:4]}-{value[4:6]}-{value[6:8]}"

    column = WorklistItem.exam_date_and_time
    expr: Any = None
    for term in c.terms:
        if term.kind is MatchKind.SINGLE:
            part = column.between(day(term.value), day(term.value) + " 23:59:59")
        else:
            part = column.is_null(False)
            if term.value:
                part &= column >= day(term.value)
            if term.upper:
                part &= column <= day(term.upper) + " 23:59:59"
        expr = part if expr is None else expr | part
    return expr


def prefilter(institution: str, constraints: list[Constraint]) -> list[Any]:
    """SQL conditions that select a superset of the matching items of ``institution``."""
    conds: list[Any] = [WorklistItem.institution == institution]
    top = {c.tag: c for c in constraints}
    sps_constraint = top.get(SPS_SEQUENCE)
    sps = {s.tag: s for s in sps_constraint.terms[0].items} if sps_constraint else {}
    if _SPS_STATUS_TAG not in sps:
        conds.append(WorklistItem.status.in_(_ACTIVE))
    columns = (
        (sps.get(_tag("ScheduledStationAETitle")), WorklistItem.scheduled_aet),
        (sps.get(_tag("Modality")), WorklistItem.modality),
        (top.get(_tag("PatientID")), WorklistItem.patient_id),
        (top.get(_tag("AccessionNumber")), WorklistItem.accession_number),
        (top.get(_tag("StudyInstanceUID")), WorklistItem.study_instance_uid),
    )
    for c, column in columns:
        values = _singles(c)
        if values is not None:
            conds.append(column.in_(values))
    start_date = sps.get(_tag("ScheduledProcedureStepStartDate"))
    if start_date is not None:
        conds.append(_date_sql(start_date))
    return conds


# -- responses ----------------------------------------------------------------------------------


def _selected(request: Dataset, full: Dataset) -> Dataset:
    """The requested keys of ``full``: values where it has them, empty otherwise (K.2.2.1.2).

    A requested sequence with an item gets its items with the requested sub-keys only; a
    zero-length sequence key returns the whole sequence.
    """
    out = Dataset()
    for elem in request:
        tag = int(elem.tag)
        if tag in (_CHARSET, _QR_LEVEL) or tag >> 16 in (0x0000, 0x0002) or tag & 0xFFFF == 0:
            continue
        if tag not in full:
            vr = str(elem.VR or "UN").split(" or ")[0]
            out[tag] = DataElement(tag, vr, [] if vr == "SQ" else None)
            continue
        source = full[tag]
        wanted = list(elem.value or []) if elem.VR == "SQ" else []
        if source.VR == "SQ" and wanted and len(wanted[0]):
            out[tag] = DataElement(
                tag, "SQ", Sequence([_selected(wanted[0], item) for item in source.value])
            )
        else:
            out[tag] = source
    return out


def _non_ascii(ds: Dataset) -> bool:
    for elem in ds:
        if elem.VR == "SQ":
            if any(_non_ascii(item) for item in elem.value):
                return True
        elif elem.value is not None and not str(elem.value).isascii():
            return True
    return False


def response_identifier(request: Dataset, full: Dataset) -> Dataset:
    out = _selected(request, full)
    if _non_ascii(out):
        out.SpecificCharacterSet = "ISO_IR 192"
    return out


def _keys_for_audit(constraints: Iterable[Constraint], prefix: str = "") -> dict[str, str]:
    """The matching keys, sequence items' as ``Sequence.Key``, for the audit trail."""
    keys: dict[str, str] = {}
    for c in constraints:
        name = prefix + (keyword_for_tag(c.tag) or f"{c.tag:08X}")
        if c.vr == "SQ":
            for term in c.terms:
                keys.update(_keys_for_audit(term.items, f"{name}."))
        elif not c.universal:
            keys[name] = "\\".join(t.value + (f"-{t.upper}" if t.upper else "") for t in c.terms)
    return keys


def _failure(status: int, comment: str, **fields: Any) -> Dataset:
    """A status dataset with an Error Comment (LO, at most 64 characters, PS3.7 C.4)."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment.replace("\\", "/")[:64]
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    return ds


def _calling(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _peer(event: Event) -> str:
    return f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"


class WorklistHandlers:
    """EVT_C_FIND for the MWL SOP class, EVT_N_CREATE and EVT_N_SET for MPPS."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.settings = archive.settings
        self.audit = archive.audit

    def _may_query(self, calling: str) -> bool:
        peer = self.settings.peer(calling)
        return self.settings.unknown_aes_may_query if peer is None else peer.query

    # -- MWL C-FIND -----------------------------------------------------------------------------
    def find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """Modality Worklist C-FIND SCP (PS3.4 K.4.1, K.6.1).

        Pending 0xFF00 per item, 0xFF01 when a matching key was ignored as unsupported
        (K.4.1.1.4); failures 0xA900 (identifier does not match the SOP class, e.g. an invalid
        date or range) and 0xC000 (identifier cannot be decoded); 0xFE00 when cancelled.
        """
        calling = _calling(event)
        if not self._may_query(calling):
            self.audit.record("dimse.mwl_find", calling, "denied", peer=_peer(event))
            yield _failure(0xC001, f"{calling} may not query"), None
            return
        institution = institution_of(self.archive, calling)
        failure: Dataset | None = None
        try:
            request = event.identifier
            keys = parse_keys(request)
            constraints, ignored = matching_constraints(keys)
        except QueryError as exc:
            failure = _failure(exc.status, str(exc))
        except Exception as exc:  # an identifier pydicom cannot decode
            log.warning("MWL C-FIND from %s: undecodable identifier: %s", calling, exc)
            failure = _failure(0xC000, f"cannot decode the identifier: {exc}")
        if failure is not None:
            self.audit.record(
                "dimse.mwl_find",
                calling,
                "refused",
                peer=_peer(event),
                status=f"0x{int(failure.Status):04X}",
                reason=str(failure.ErrorComment),
            )
            yield failure, None
            return
        ignore_case = self.settings.case_insensitive_pn
        results: list[Dataset] = []
        if institution:
            with session():
                rows = list(
                    WorklistItem.select()
                    .where(*prefilter(institution, constraints))
                    .order_by(WorklistItem.exam_date_and_time, WorklistItem.id)
                )
            for row in rows:
                full = item_dataset(row)
                as_json = dicom_json.to_json(full)
                if all(matches_json(c, as_json, ignore_case) for c in constraints):
                    results.append(response_identifier(request, full))
        self.audit.record(
            "dimse.mwl_find",
            calling,
            peer=_peer(event),
            institution=institution or None,
            keys=_keys_for_audit(keys),
            results=len(results),
        )
        pending = 0xFF01 if ignored else 0xFF00
        for identifier in results:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield pending, identifier

    # -- MPPS N-CREATE --------------------------------------------------------------------------
    def n_create(self, event: Event) -> tuple[int | Dataset, Dataset | None]:
        """MPPS N-CREATE SCP (PS3.4 F.7.2.1): the procedure step started."""
        calling = _calling(event)
        institution = institution_of(self.archive, calling)
        request = cast(N_CREATE, event.request)
        requested = str(request.AffectedSOPInstanceUID or "").strip("\0 ")
        uid = requested or str(generate_uid())

        def refuse(status: Dataset, **details: Any) -> tuple[Dataset, None]:
            self.audit.record(
                "dimse.mpps_create",
                calling,
                "refused",
                peer=_peer(event),
                mpps=uid,
                institution=institution or None,
                status=f"0x{int(status.Status):04X}",
                reason=str(status.ErrorComment),
                **details,
            )
            return status, None

        if not is_valid_uid(uid):
            return refuse(_failure(0x0117, f"{uid!r} is not a valid SOP Instance UID"))
        try:
            attributes = event.attribute_list
            state = attributes.get("PerformedProcedureStepStatus")
            steps = [
                (str(s.get("AccessionNumber") or "").strip(), str(s.get("StudyInstanceUID") or ""))
                for s in attributes.get("ScheduledStepAttributesSequence") or []
            ]
            as_json = _mpps_json(attributes)
        except Exception as exc:
            log.warning("MPPS N-CREATE from %s: undecodable attribute list: %s", calling, exc)
            return refuse(_failure(0x0110, f"cannot decode the attribute list: {exc}"))
        if state is None:
            return refuse(_failure(0x0120, "Performed Procedure Step Status is missing"))
        if not str(state).strip():
            return refuse(_failure(0x0121, "Performed Procedure Step Status is empty"))
        if str(state).strip() != "IN PROGRESS":
            return refuse(
                _failure(0x0106, f"Performed Procedure Step Status {state} is not IN PROGRESS")
            )
        with session():
            if MppsInstance.get_or_none(MppsInstance.sop_instance_uid == uid) is not None:
                return refuse(_failure(0x0111, f"MPPS {uid} exists"))
            items = _items_for(institution, steps)
            target, allowed = service.MPPS_STATUS["IN PROGRESS"]
            for item in items:
                again = item.status == target and item.mpps_instance_uid == uid
                if item.status not in allowed and not again:
                    return refuse(
                        _failure(0x0110, f"worklist item {item.accession_number} is {item.status}"),
                        accession_number=item.accession_number,
                    )
            try:
                for item in items:
                    service.apply_mpps_status(item, "IN PROGRESS", uid)
            except service.InvalidTransition as exc:
                return refuse(_failure(0x0110, str(exc)))
            now = int(time.time())
            first_accession, first_study = steps[0] if steps else ("", "")
            try:
                with write_transaction():
                    MppsInstance.create(
                        sop_instance_uid=uid,
                        institution=institution,
                        calling_ae=calling,
                        status="IN PROGRESS",
                        item_ids=" ".join(str(item.id) for item in items),
                        accession_number=first_accession or None,
                        study_instance_uid=first_study or None,
                        attributes=dicom_json.dumps(as_json).decode("utf-8"),
                        created_at=now,
                        updated_at=now,
                    )
            except IntegrityError:
                return refuse(_failure(0x0111, f"MPPS {uid} exists"))
        self.audit.record(
            "dimse.mpps_create",
            calling,
            peer=_peer(event),
            mpps=uid,
            institution=institution or None,
            status="IN PROGRESS",
            items=[item.accession_number for item in items],
            scheduled=bool(items),
        )
        if requested:
            return 0x0000, None
        created = Dataset()
        created.AffectedSOPInstanceUID = uid  # PS3.7 10.1.5.1.4: the SCP assigned it
        return 0x0000, created

    # -- MPPS N-SET -----------------------------------------------------------------------------
    def n_set(self, event: Event) -> tuple[int | Dataset, Dataset | None]:
        """MPPS N-SET SCP (PS3.4 F.7.2.2): attribute updates, COMPLETED or DISCONTINUED."""
        calling = _calling(event)
        institution = institution_of(self.archive, calling)
        uid = str(cast(N_SET, event.request).RequestedSOPInstanceUID or "").strip("\0 ")

        def refuse(status: Dataset) -> tuple[Dataset, None]:
            self.audit.record(
                "dimse.mpps_set",
                calling,
                "refused",
                peer=_peer(event),
                mpps=uid,
                institution=institution or None,
                status=f"0x{int(status.Status):04X}",
                reason=str(status.ErrorComment),
            )
            return status, None

        try:
            modifications = event.modification_list
            state = modifications.get("PerformedProcedureStepStatus")
            changes = _mpps_json(modifications)
            changes.pop(f"{_SSA_SEQUENCE:08X}", None)  # set by N-CREATE only (Table F.7.2-1)
        except Exception as exc:
            log.warning("MPPS N-SET from %s: undecodable modification list: %s", calling, exc)
            return refuse(_failure(0x0110, f"cannot decode the modification list: {exc}"))
        with session():
            conds = [MppsInstance.sop_instance_uid == uid, MppsInstance.institution == institution]
            if not institution:
                conds.append(MppsInstance.calling_ae == calling)
            row = MppsInstance.get_or_none(*conds)
            if row is None:
                return refuse(_failure(0x0112, f"no MPPS {uid}"))
            if row.status != "IN PROGRESS":
                return refuse(_no_longer_updatable())
            new_state = row.status if state is None else str(state).strip()
            if new_state not in service.MPPS_STATUS:
                return refuse(
                    _failure(
                        0x0106,
                        f"Performed Procedure Step Status {new_state!r} is not valid",
                        AttributeIdentifierList=[_PPS_STATUS],
                    )
                )
            items = _items_by_id(row.item_ids)
            if new_state != "IN PROGRESS":
                target, allowed = service.MPPS_STATUS[new_state]
                for item in items:
                    again = item.status == target and item.mpps_instance_uid == uid
                    if item.status not in allowed and not again:
                        return refuse(
                            _failure(
                                0x0110, f"worklist item {item.accession_number} is {item.status}"
                            )
                        )
                try:
                    for item in items:
                        service.apply_mpps_status(item, new_state, uid)
                except service.InvalidTransition as exc:
                    return refuse(_failure(0x0110, str(exc)))
            stored = dicom_json.loads(row.attributes)
            stored.update(changes)
            with write_transaction():
                updated = (
                    MppsInstance.update(
                        status=new_state,
                        attributes=dicom_json.dumps(stored).decode("utf-8"),
                        updated_at=int(time.time()),
                    )
                    .where((MppsInstance.id == row.id) & (MppsInstance.status == "IN PROGRESS"))
                    .execute()
                )
            if not updated:
                return refuse(_no_longer_updatable())
        self.audit.record(
            "dimse.mpps_set",
            calling,
            peer=_peer(event),
            mpps=uid,
            institution=institution or None,
            status=new_state,
            items=[item.accession_number for item in items],
        )
        return 0x0000, None


def _no_longer_updatable() -> Dataset:
    """PS3.4 F.7.2.2.2 and Table F.7.2-2: 0x0110 with Error ID 0xA710."""
    return _failure(
        0x0110, "Performed Procedure Step Object may no longer be updated", ErrorID=0xA710
    )


def _mpps_json(ds: Dataset) -> dict[str, Any]:
    """The MPPS attributes as DICOM JSON: text is decoded, so whatever character set each
    N-CREATE/N-SET used, the stored whole is Unicode (F.7.2.2.3)."""
    out = dicom_json.to_json(ds)
    out[f"{_CHARSET:08X}"] = {"vr": "CS", "Value": ["ISO_IR 192"]}
    return out


def _items_for(institution: str, steps: list[tuple[str, str]]) -> list[Any]:
    """The worklist items of ``institution`` that the scheduled steps name (none without an
    institution: such an AE's MPPS is kept but touches no item)."""
    if not institution:
        return []
    found: dict[int, Any] = {}
    for accession, study_uid in steps:
        item = service.find_for_mpps(institution, accession, study_uid)
        if item is not None:
            found.setdefault(item.id, item)
    return list(found.values())


def _items_by_id(ids: str) -> list[Any]:
    wanted = [int(i) for i in ids.split()]
    if not wanted:
        return []
    return list(WorklistItem.select().where(WorklistItem.id.in_(wanted)))
