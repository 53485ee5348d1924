"""C-MOVE against destinations that do not simply succeed (PS3.4 C.4.2.1.4, C.4.2.3).

The sub-operations' C-STORE responses are read straight from the destination's socket
(server/dimse/retrieve.py), so what pynetdicom would otherwise handle is proven here with a
pynetdicom destination whose answers the test chooses: warnings and failures counted per
sub-operation, the failed instances listed, a destination that aborts mid-retrieve, and the
sub-association released (not aborted) when all went well.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

from tests.helpers import echo, free_port
from tools.generate import StudySpec, small_instance


class Destination:
    """A pynetdicom Storage SCP answering each C-STORE with ``answer(n, dataset)``."""

    def __init__(self, answer: Callable[[int, Any], int]) -> None:
        self.answer = answer
        self.received: list[str] = []
        self.released = threading.Event()
        self.aborted = threading.Event()

    def _store(self, event: Any) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.answer(len(self.received), event)


@contextmanager
def destination(title: str, port: int, answer: Callable[[int, Any], int]) -> Iterator[Destination]:
    dest = Destination(answer)
    ae = AE(ae_title=title)
    ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    handlers = [
        (evt.EVT_C_STORE, dest._store),
        (evt.EVT_RELEASED, lambda event: dest.released.set()),
        (evt.EVT_ABORTED, lambda event: dest.aborted.set()),
    ]
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        yield dest
    finally:
        server.shutdown()


def _stored(port: int, count: int) -> tuple[Any, list[Dataset], StudySpec]:
    spec = StudySpec()
    datasets = [small_instance(spec, number=n) for n in range(count)]
    ae = AE(ae_title="MOVER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING")
    assert assoc.is_established
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    return assoc, datasets, spec


def _move(assoc: Any, spec: StudySpec, title: str) -> list[tuple[Dataset, Dataset | None]]:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = spec.study_uid
    return list(assoc.send_c_move(query, title, MOVE))


def test_statuses_of_sub_operations_are_counted(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Success, warning and failure answers become the completed/warning/failed counts, the
    final status is 0xB000 and the failed instance is listed (PS3.4 C.4.2.1.4.2)."""
    port = free_port()
    server = server_factory("", peers=(("PICKY", port),), name="picky")
    assoc, datasets, spec = _stored(server.port, 4)
    answers = {1: 0x0000, 2: 0xB000, 3: 0xA700, 4: 0x0000}
    with destination("PICKY", port, lambda n, event: answers[n]) as dest:
        responses = _move(assoc, spec, "PICKY")
        assert dest.released.wait(10)
    assoc.release()
    assert not dest.aborted.is_set()
    pending = [status for status, _ in responses[:-1]]
    assert [s.Status for s in pending] == [0xFF00] * 4
    assert [s.NumberOfRemainingSuboperations for s in pending] == [3, 2, 1, 0]
    assert [s.NumberOfFailedSuboperations for s in pending] == [0, 0, 1, 1]
    final, identifier = responses[-1]
    assert final.Status == 0xB000
    assert final.NumberOfCompletedSuboperations == 2
    assert final.NumberOfWarningSuboperations == 1
    assert final.NumberOfFailedSuboperations == 1
    assert identifier is not None
    failed = identifier.FailedSOPInstanceUIDList
    assert ([failed] if isinstance(failed, str) else list(failed)) == [dest.received[2]]
    assert sorted(dest.received) == sorted(str(ds.SOPInstanceUID) for ds in datasets)


def test_destination_that_aborts_fails_the_rest_and_the_server_lives_on(server_factory) -> None:  # type: ignore[no-untyped-def]
    port, good = free_port(), free_port()
    server = server_factory("", peers=(("ABORTER", port), ("GOOD", good)), name="aborted")
    assoc, _, spec = _stored(server.port, 5)

    def answer(n: int, event: Any) -> int:
        if n == 2:
            event.assoc.abort()
        return 0x0000

    with destination("ABORTER", port, answer) as dest:
        responses = _move(assoc, spec, "ABORTER")
    final = responses[-1][0]
    assert final.Status in (0xA702, 0xB000)  # all failed, or some (PS3.4 C.4.2.1.4.1)
    assert final.NumberOfCompletedSuboperations == 1
    assert final.NumberOfFailedSuboperations == 4
    assert dest.aborted.is_set()
    assert echo(server.port)
    with destination("GOOD", good, lambda n, event: 0x0000) as dest:
        responses = _move(assoc, spec, "GOOD")
        assert dest.released.wait(10)
    assoc.release()
    assert responses[-1][0].Status == 0x0000
    assert responses[-1][0].NumberOfCompletedSuboperations == 5
    assert len(dest.received) == 5


def test_instances_needing_conversion_between_raw_ones(  # type: ignore[no-untyped-def]
    server_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A destination that takes CT only in Implicit VR: those instances go through pynetdicom
    (decoded, converted), between secondary captures sent raw on the same sub-association,
    which must give its threads back for them and take them again after."""
    from pynetdicom import _config

    # Importing the server's AE in this process (another test does) lets any storage SCP here
    # accept every syntax; this peer must keep to the one it lists.
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage

    from tools.generate import ct_series

    port = free_port()
    server = server_factory("", peers=(("MIXED", port),), name="mixed")
    spec = StudySpec()
    ct = next(ct_series(spec, 1, 32))
    datasets = [small_instance(spec, number=1), small_instance(spec, number=2), ct]
    datasets.append(small_instance(spec, number=3))
    ae = AE(ae_title="MOVER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    dest = Destination(lambda n, event: 0x0000)
    dest_ae = AE(ae_title="MIXED")
    dest_ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    dest_ae.add_supported_context(CTImageStorage, [ImplicitVRLittleEndian])
    syntaxes: dict[str, str] = {}

    def store(event: Any) -> int:
        syntaxes[str(event.request.AffectedSOPInstanceUID)] = str(event.context.transfer_syntax)
        return dest._store(event)

    handlers = [(evt.EVT_C_STORE, store), (evt.EVT_RELEASED, lambda e: dest.released.set())]
    scp = dest_ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    try:
        responses = _move(assoc, spec, "MIXED")
        assert dest.released.wait(10)
    finally:
        scp.shutdown()
    assoc.release()
    final = responses[-1][0]
    assert final.Status == 0x0000 and final.NumberOfCompletedSuboperations == 4
    assert syntaxes[str(ct.SOPInstanceUID)] == ImplicitVRLittleEndian
    assert {syntaxes[str(ds.SOPInstanceUID)] for ds in datasets if ds is not ct} == {
        ExplicitVRLittleEndian
    }


def test_a_destination_with_tiny_pdus(server_factory) -> None:  # type: ignore[no-untyped-def]
    """A Maximum Length of 128 bytes (PS3.8 D.1 sets no lower bound): the command set is
    split across PDUs too, and every byte arrives."""
    port = free_port()
    server = server_factory("", peers=(("TINY", port),), name="tiny")
    assoc, datasets, spec = _stored(server.port, 3)
    dest = Destination(lambda n, event: 0x0000)
    dest_ae = AE(ae_title="TINY")
    dest_ae.maximum_pdu_size = 128
    dest_ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    pixels: dict[str, bytes] = {}

    def store(event: Any) -> int:
        pixels[str(event.request.AffectedSOPInstanceUID)] = event.dataset.PixelData
        return dest._store(event)

    scp = dest_ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, store)]
    )
    try:
        responses = _move(assoc, spec, "TINY")
    finally:
        scp.shutdown()
    assoc.release()
    assert responses[-1][0].Status == 0x0000
    assert pixels == {str(ds.SOPInstanceUID): ds.PixelData for ds in datasets}
