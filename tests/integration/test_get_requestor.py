"""C-GET against a requestor that does not simply succeed (PS3.4 C.4.3.1.4, C.4.3.3).

The sub-operations' C-STORE responses arrive on the requesting association and are read
straight from its socket (server/dimse/retrieve.py), so what pynetdicom's socket thread did is
proven here with a pynetdicom requestor whose answers the test chooses: statuses counted per
sub-operation and a C-CANCEL-RQ sent in the middle of the retrieve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

from tests.helpers import echo
from tools.generate import StudySpec, small_instance


def _store(port: int, count: int) -> StudySpec:
    spec = StudySpec()
    ae = AE(ae_title="LOADER")
    ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING")
    for n in range(count):
        assert assoc.send_c_store(small_instance(spec, number=n)).Status == 0
    assoc.release()
    return spec


def _get(
    port: int, spec: StudySpec, answer: Callable[[int, Any], int]
) -> tuple[list[Dataset], list[str]]:
    """C-GET the study; ``answer(n, event)`` is the status of the n-th C-STORE received."""
    received: list[str] = []

    def store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return answer(len(received), event)

    ae = AE(ae_title="GETTER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(GET)
    ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    role = build_role(SecondaryCaptureImageStorage, scp_role=True)
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title="IMAGING",
        ext_neg=[role],
        evt_handlers=[(evt.EVT_C_STORE, store)],
    )
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = spec.study_uid
    statuses = [status for status, _ in assoc.send_c_get(query, GET)]
    assoc.release()
    return statuses, received


def test_statuses_of_sub_operations_are_counted(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory("", name="getter")
    spec = _store(server.port, 4)
    answers = {1: 0x0000, 2: 0xB000, 3: 0xA700, 4: 0x0000}
    statuses, received = _get(server.port, spec, lambda n, event: answers[n])
    assert len(received) == 4
    pending = statuses[:-1]
    assert [s.Status for s in pending] == [0xFF00] * 4
    assert [s.NumberOfRemainingSuboperations for s in pending] == [3, 2, 1, 0]
    final = statuses[-1]
    assert final.Status == 0xB000
    assert final.NumberOfCompletedSuboperations == 2
    assert final.NumberOfWarningSuboperations == 1
    assert final.NumberOfFailedSuboperations == 1


def test_cancel_in_the_middle_stops_the_retrieve(server_factory) -> None:  # type: ignore[no-untyped-def]
    """A C-CANCEL-RQ sent before the 2nd C-STORE-RSP (PS3.4 C.4.3.3): the SCP stops and
    answers Cancel (0xFE00) with the counts so far; the association goes on working."""
    server = server_factory("", name="cancelled")
    spec = _store(server.port, 6)

    def answer(n: int, event: Any) -> int:
        if n == 2:  # the cancel goes out before this C-STORE's response
            get_context = next(
                cx for cx in event.assoc.accepted_contexts if cx.abstract_syntax == GET
            )
            event.assoc.send_c_cancel(1, get_context.context_id)  # send_c_get's msg_id=1
        return 0x0000

    statuses, received = _get(server.port, spec, answer)
    final = statuses[-1]
    assert final.Status == 0xFE00
    assert 2 <= len(received) < 6
    assert final.NumberOfCompletedSuboperations == len(received)
    assert final.NumberOfRemainingSuboperations == 6 - len(received)
    assert echo(server.port)
    statuses, received = _get(server.port, spec, lambda n, event: 0x0000)
    assert statuses[-1].Status == 0x0000 and len(received) == 6


def test_instances_needing_conversion_between_raw_ones(  # type: ignore[no-untyped-def]
    server_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The requestor takes CT only in Implicit VR: those sub-operations go through
    pynetdicom's own send, between secondary captures sent raw, so the retrieve gives the
    socket thread back for them and takes it again after."""
    from pynetdicom import _config

    # Importing the server's AE in this process (another test does) lets any storage SCP here
    # accept every syntax; this peer must keep to the one it lists.
    monkeypatch.setattr(_config, "UNRESTRICTED_STORAGE_SERVICE", False)
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom.sop_class import CTImageStorage

    from tools.generate import ct_series

    server = server_factory("", name="mixedget")
    spec = StudySpec()
    ct = next(ct_series(spec, 1, 32))
    datasets = [small_instance(spec, number=1), ct, small_instance(spec, number=2)]
    loader = AE(ae_title="LOADER")
    loader.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    loader.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = loader.associate("127.0.0.1", server.port, ae_title="IMAGING")
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()

    syntaxes: dict[str, str] = {}

    def store(event: Any) -> int:
        syntaxes[str(event.request.AffectedSOPInstanceUID)] = str(event.context.transfer_syntax)
        return 0x0000

    ae = AE(ae_title="GETTER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(GET)
    ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(CTImageStorage, [ImplicitVRLittleEndian])
    roles = [build_role(c, scp_role=True) for c in (SecondaryCaptureImageStorage, CTImageStorage)]
    assoc = ae.associate(
        "127.0.0.1",
        server.port,
        ae_title="IMAGING",
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, store)],
    )
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = spec.study_uid
    statuses = [status for status, _ in assoc.send_c_get(query, GET)]
    assoc.release()
    assert statuses[-1].Status == 0x0000
    assert statuses[-1].NumberOfCompletedSuboperations == 3
    assert syntaxes[str(ct.SOPInstanceUID)] == ImplicitVRLittleEndian
    assert len(syntaxes) == 3
