"""DIMSE service handlers: small functions bound to pynetdicom events.

Each one turns the request into a call on the shared archive pieces (ingest, query engine) and
the outcome into the status PS3.4 defines.  An unexpected exception becomes a failure status,
never a dead association (pynetdicom catches it, we log it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import build_context
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
)

from server import tls
from server.archive import Archive
from server.audit import subjects
from server.catalog.db import session
from server.catalog.search import RetrieveItem, retrieve_items, search
from server.dicom.query import Model, Query, parse_identifier
from server.dimse.fastpath import part10, send_find_pending
from server.dimse.retrieve import StoredFile
from server.errors import DatasetMismatch, IngestError, QueryError
from server.ingest import Later

log = logging.getLogger(__name__)
_PATIENT_ROOT = {
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
}
_UNCOMPRESSED = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, UID("1.2.840.10008.1.2.2")}


def failure(status: int, comment: str) -> Dataset:
    """A status dataset with an Error Comment (LO: at most 64 characters, PS3.7 C.4)."""
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment.replace("\\", "/")[:64]
    return ds


def _calling(event: Event) -> str:
    return str(event.assoc.requestor.ae_title).strip()


def _peer(event: Event) -> str:
    return f"{event.assoc.requestor.address}:{event.assoc.requestor.port}"


def _keys(query: Query) -> dict[str, str]:
    """The matching keys of a query, for the audit trail."""
    return {
        c.keyword: "\\".join(t.value + (f"-{t.upper}" if t.upper else "") for t in c.terms)
        for c in query.matching
    }


class StoreTally:
    """What one association stored, summarised into one audit line when it closes."""

    def __init__(self) -> None:
        self.studies: set[str] = set()
        self.stored = 0
        self.duplicates = 0
        self.refused = 0
        self.nonconformant = 0
        self.problems: list[str] = []  # the first few, for the trail


class Handlers:
    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self.settings = archive.settings
        self.audit = archive.audit
        self._tallies: dict[int, StoreTally] = {}

    def _tally(self, event: Event) -> StoreTally:
        return self._tallies.setdefault(id(event.assoc), StoreTally())

    def closed(self, event: Event) -> None:
        """EVT_CONN_CLOSE: write the association's store summary to the audit trail."""
        tally = self._tallies.pop(id(event.assoc), None)
        if tally is not None:
            self.audit_stores(_calling(event), _peer(event), tally)

    def audit_stores(self, calling: str, peer: str, tally: StoreTally) -> None:
        """One audit line for what an association stored."""
        self.audit.record(
            "dimse.store",
            calling,
            "ok" if not tally.refused else "partial",
            peer=peer,
            studies=sorted(tally.studies),
            stored=tally.stored,
            duplicates=tally.duplicates,
            refused=tally.refused,
            nonconformant=tally.nonconformant,
            problems=tally.problems,
        )

    # -- permissions ------------------------------------------------------------------------
    def _may(self, event: Event, what: str) -> bool:
        return self.may(_calling(event), what)

    def may(self, calling: str, what: str) -> bool:
        peer = self.settings.peer(calling)
        if peer is None:
            if what == "store":
                return True
            if what == "query":
                return self.settings.unknown_aes_may_query
            return self.settings.unknown_aes_may_retrieve
        return bool(getattr(peer, what))

    # -- C-STORE ----------------------------------------------------------------------------
    def store(self, event: Event) -> int | Dataset:
        """C-STORE SCP (PS3.4 B.2) for associations pynetdicom serves."""
        request = cast(C_STORE, event.request)
        status, comment = self.store_received(
            self._tally(event),
            _calling(event),
            str(event.context.abstract_syntax),
            str(event.context.transfer_syntax),
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID or ""),
            cast(BytesIO, request.DataSet).getvalue(),
        )
        return failure(status, comment) if comment is not None else status

    def store_received(
        self,
        tally: StoreTally,
        calling: str,
        context_class: str,
        transfer_syntax: str,
        sop_class: str,
        sop_instance: str,
        data: bytes,
        later: Later | None = None,
    ) -> tuple[int, str | None]:
        """One received C-STORE data set through ingest: (status, Error Comment or None).

        0x0000 only once the file and the catalog row are durable (PS3.4 B.2.3). ``later``:
        see :meth:`~server.ingest.Ingestor.ingest`."""
        if not self.may(calling, "store"):
            tally.refused += 1
            return 0xA700, f"{calling} may not store here"
        try:
            if sop_class != context_class:
                # The file meta would name one class and the data set another (tools/fuzz.py).
                raise DatasetMismatch(
                    f"Affected SOP Class UID is not the presentation context's: "
                    f"{sop_class} vs {context_class}"
                )
            result = self.archive.ingestor.ingest(
                part10(sop_class, sop_instance, transfer_syntax, calling, data),
                source=f"dimse:{calling}",
                expect_sop_class=context_class,
                expect_sop_instance=sop_instance or None,
                institution=self.settings.institution_of(calling),
                later=later,
            )
        except IngestError as exc:
            log.warning("C-STORE from %s refused (0x%04X): %s", calling, exc.status, exc)
            tally.refused += 1
            return exc.status, str(exc).replace("\\", "/")[:64]
        tally.studies.add(result.study_instance_uid)
        if result.outcome == "duplicate":
            tally.duplicates += 1
        else:
            tally.stored += 1
        if result.warnings:
            # Stored with 0x0000 all the same: many modalities treat any other status as a
            # failure and send again. The problems go to the audit trail.
            tally.nonconformant += 1
            if len(tally.problems) < 10:
                tally.problems.append(f"{result.sop_instance_uid}: {'; '.join(result.warnings)}")
        return 0x0000, None

    # -- C-FIND -----------------------------------------------------------------------------
    def _query(self, event: Event) -> Query:
        """The request's identifier as a query. An AE bound to an institution (``institution``
        in peers.toml) queries and retrieves that institution's studies only; an AE without
        one sees the whole archive, as before tenants existed."""
        try:
            query = parse_identifier(
                event.identifier,
                self._model(event),
                case_insensitive_pn=self.settings.case_insensitive_pn,
            )
        except QueryError:
            raise
        except Exception as exc:
            # pydicom raises many kinds of errors on identifiers it cannot decode (found by
            # tools/fuzz.py); they are a failure status, as for the worklist, not a traceback.
            log.warning("C-FIND from %s: undecodable identifier: %s", _calling(event), exc)
            raise QueryError(f"cannot decode the identifier: {exc}", 0xC000) from exc
        institution = self.settings.institution_of(_calling(event))
        return replace(query, institution=institution) if institution else query

    def _model(self, event: Event) -> Model:
        sop_class = event.request.AffectedSOPClassUID
        return Model.PATIENT_ROOT if sop_class in _PATIENT_ROOT else Model.STUDY_ROOT

    def find(self, event: Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """C-FIND SCP (PS3.4 C.4.1): one pending response per match, then success."""
        if not self._may(event, "query"):
            self.audit.record("dimse.find", _calling(event), "denied", peer=_peer(event))
            yield failure(0xC001, f"{_calling(event)} may not query"), None
            return
        cap = self.settings.max_query_results
        try:
            query = self._query(event)
            if cap:
                query = replace(query, limit=cap, offset=0)
            with session():
                result = search(query)
        except QueryError as exc:
            yield failure(exc.status, str(exc)), None
            return
        matches = result.matches
        if result.truncated:
            # PS3.4 C.4.1.1.4 "Refused: Out of Resources": a query this wide would flood the
            # caller; it is told to narrow the keys rather than handed an arbitrary subset.
            self.audit.record(
                "dimse.find", _calling(event), "refused", peer=_peer(event), keys=_keys(query)
            )
            yield failure(0xA700, f"more than {cap} matches; add matching keys"), None
            return
        self.audit.record(
            "dimse.find",
            _calling(event),
            peer=_peer(event),
            level=query.level.name,
            keys=_keys(query),
            results=len(matches),
            **subjects(m.values for m in matches),
        )
        if not send_find_pending(event, query, matches):
            yield 0xFE00, None  # cancelled: PS3.4 C.4.1.3.2

    # -- C-MOVE / C-GET ---------------------------------------------------------------------
    def _items(
        self, event: Event, action: str, destination: str | None = None
    ) -> list[RetrieveItem]:
        query = self._query(event)
        with session():
            items = retrieve_items(query)
        self.audit.record(
            action,
            _calling(event),
            peer=_peer(event),
            destination=destination,
            level=query.level.name,
            keys=_keys(query),
            instances=len(items),
        )
        return items

    def _datasets(
        self, event: Event, items: list[RetrieveItem]
    ) -> Iterator[tuple[int, Dataset | None]]:
        for item in items:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            path: Path = self.archive.storage.local_path(item.file_path)
            yield (
                0xFF00,
                StoredFile(
                    path, item.sop_class_uid, item.sop_instance_uid, item.transfer_syntax_uid
                ),
            )

    def move(self, event: Event) -> Iterator[Any]:
        """C-MOVE SCP (PS3.4 C.4.2): sub-operations to a destination known in ``peers.toml``."""
        destination = self.settings.peer(str(event.move_destination).strip())
        if destination is None or not destination.move_destination:
            log.warning("C-MOVE to unknown destination %r", event.move_destination)
            yield None, None  # pynetdicom answers 0xA801 Move Destination unknown
            return
        if not self._may(event, "retrieve"):
            self.audit.record("dimse.move", _calling(event), "denied", peer=_peer(event))
            yield destination.host, destination.port
            yield 1
            yield failure(0xC001, f"{_calling(event)} may not retrieve"), None
            return
        try:
            items = self._items(event, "dimse.move", destination.ae_title)
        except QueryError as exc:
            yield destination.host, destination.port
            yield 1
            yield failure(exc.status, str(exc)), None
            return
        yield (
            destination.host,
            destination.port,
            {
                "contexts": _contexts_for(items),
                "ae_title": destination.ae_title,
                "tls_args": tls.client_args(self.settings, destination),  # PS3.15 Annex B
            },
        )
        yield len(items)
        yield from self._datasets(event, items)

    def get(self, event: Event) -> Iterator[Any]:
        """C-GET SCP (PS3.4 C.4.3): sub-operations on the requesting association."""
        if not self._may(event, "retrieve"):
            self.audit.record("dimse.get", _calling(event), "denied", peer=_peer(event))
            yield 1
            yield failure(0xC001, f"{_calling(event)} may not retrieve"), None
            return
        try:
            items = self._items(event, "dimse.get")
        except QueryError as exc:
            yield 1
            yield failure(exc.status, str(exc)), None
            return
        yield len(items)
        yield from self._datasets(event, items)


def _contexts_for(items: list[RetrieveItem]) -> list[Any]:
    """Presentation contexts for a C-MOVE sub-association: each SOP class in its stored syntax,
    plus the uncompressed little-endian syntaxes so the destination may pick those instead."""
    wanted: dict[str, list[str]] = {}
    for item in items:
        syntaxes = wanted.setdefault(item.sop_class_uid, [])
        if item.transfer_syntax_uid not in syntaxes:
            syntaxes.append(item.transfer_syntax_uid)
    contexts = []
    for sop_class, syntaxes in wanted.items():
        for syntax in syntaxes:
            offered = [syntax]
            if UID(syntax) in _UNCOMPRESSED:
                offered += [
                    s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != syntax
                ]
            contexts.append(build_context(sop_class, offered))
    return contexts[:128]  # PS3.8 9.3.2.2: at most 128 presentation contexts
