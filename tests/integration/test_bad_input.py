"""Bad input gets the PS3.4 status with an Error Comment, stores nothing, and the server lives on.

pynetdicom is the SCU here; where it refuses to send malformed requests itself, the C-STORE
primitive is built by hand so the server sees exactly the bytes a broken modality would send.
"""

from __future__ import annotations

import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, build_context
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from tests.helpers import ServerProcess, echo
from tools.generate import StudySpec, ct_series, small_instance


def _assoc(port: int, calling: str = "BADSCU", contexts: list | None = None):  # type: ignore[no-untyped-def]
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts or [build_context(CTImageStorage, [ExplicitVRLittleEndian])]:
        ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
    return ae.associate("127.0.0.1", port, ae_title="IMAGING")


def _exchange(assoc, req: C_STORE):  # type: ignore[no-untyped-def]
    """Send one hand-built request and wait for its response, the way pynetdicom's own
    send_c_store does (the association's reactor is paused so it cannot eat the reply)."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return rsp


def _store_request(data: bytes, sop_class: str, instance_uid: str) -> C_STORE:
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = instance_uid
    req.Priority = 2
    req.DataSet = BytesIO(data)
    return req


def raw_store(
    port: int, ds: Dataset, *, sop_class: str = CTImageStorage, instance_uid: str = "1.2.3.4"
) -> Dataset:
    """Send a C-STORE whose request and dataset are exactly as given."""
    assoc = _assoc(port, contexts=[build_context(sop_class, [ExplicitVRLittleEndian])])
    assert assoc.is_established
    try:
        rsp = _exchange(assoc, _store_request(encode(ds, False, True), sop_class, instance_uid))
        status = Dataset()
        status.Status = rsp.Status
        status.ErrorComment = getattr(rsp, "ErrorComment", None) or ""
        return status
    finally:
        assoc.release()


def _one_ct(**changes: object) -> Dataset:
    ds = next(ct_series(StudySpec(), 1, 64))
    for key, value in changes.items():
        if value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def _stored_files(server: ServerProcess) -> list[Path]:
    return [p for p in (server.data_dir / "instances").rglob("*") if p.is_file()]


@pytest.fixture
def server(server_factory) -> ServerProcess:  # type: ignore[no-untyped-def]
    return server_factory("")


@pytest.mark.parametrize(
    ("changes", "status", "comment"),
    [
        ({"StudyInstanceUID": None}, 0xA900, "lacks StudyInstanceUID"),
        ({"SeriesInstanceUID": None}, 0xA900, "lacks SeriesInstanceUID"),
        ({"SOPInstanceUID": None}, 0xA900, "lacks SOPInstanceUID"),
        ({"SeriesInstanceUID": "1.2.3/../../etc"}, 0xC000, "not a valid UID"),
        ({"StudyInstanceUID": "1.2.abc"}, 0xC000, "not a valid UID"),
        ({"SOPInstanceUID": "1.2." + "3" * 80}, 0xC000, "not a valid UID"),
        ({"SOPClassUID": MRImageStorage}, 0xA900, "does not match"),
    ],
)
def test_bad_datasets_are_refused(server: ServerProcess, changes, status, comment) -> None:  # type: ignore[no-untyped-def]
    ds = _one_ct(**changes)
    instance_uid = ds.get("SOPInstanceUID", "1.2.3.4")
    if not str(instance_uid).replace(".", "").isdigit() or len(str(instance_uid)) > 64:
        instance_uid = "1.2.3.4"
    rsp = raw_store(server.port, ds, instance_uid=str(instance_uid))
    assert rsp.Status == status, rsp
    assert comment in rsp.ErrorComment
    assert _stored_files(server) == []
    assert list((server.data_dir / "tmp").iterdir()) == []
    assert echo(server.port)


def test_request_uid_mismatch_is_refused(server: ServerProcess) -> None:
    ds = _one_ct()
    rsp = raw_store(server.port, ds, instance_uid="1.2.3.999")
    assert rsp.Status == 0xA900 and "does not match" in rsp.ErrorComment


def test_garbage_dataset_is_refused(server: ServerProcess) -> None:
    assoc = _assoc(server.port)
    try:
        garbage = b"\x08\x00\x16\x00UI\xff\x7fnot dicom at all" * 3
        rsp = _exchange(assoc, _store_request(garbage, CTImageStorage, "1.2.3.4"))
        assert rsp is not None and (rsp.Status & 0xF000) in (0xC000, 0xA000)
    finally:
        assoc.release()
    assert _stored_files(server) == []
    assert echo(server.port)


def test_aborted_association_leaves_nothing(server: ServerProcess) -> None:
    """A-ABORT after part of a dataset was sent: no file, no row, and the server carries on."""
    ds = next(ct_series(StudySpec(), 1, 512))
    assoc = _assoc(server.port, calling="ABORTER")
    assert assoc.is_established
    req = _store_request(encode(ds, False, True), CTImageStorage, str(ds.SOPInstanceUID))
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    fragments = list(message.encode_msg(assoc.accepted_contexts[0].context_id, 16384))
    assert len(fragments) > 10
    for pdata in fragments[: len(fragments) // 2]:  # command and half of the dataset
        assoc.dul.send_pdu(pdata)
    assoc.abort()
    assert echo(server.port)
    assert _stored_files(server) == []
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.SOPInstanceUID = ds.SOPInstanceUID
    finder = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
    results = list(finder.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    finder.release()
    assert [s.Status for s, _ in results] == [0x0000]  # no match, just the final success


@pytest.mark.parametrize("level", ["FOO", ""])
def test_invalid_query_level(server: ServerProcess, level: str) -> None:
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
    query = Dataset()
    query.QueryRetrieveLevel = level
    query.PatientName = "*"
    results = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    status, _ = results[-1]
    assert status.Status == 0xA900
    assert "QueryRetrieveLevel" in str(status.get("ErrorComment", ""))
    assert echo(server.port)


def test_patient_level_not_in_study_root(server: ServerProcess) -> None:
    ae = AE()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientID = "*"
    results = list(assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind))
    assoc.release()
    assert results[-1][0].Status == 0xA900


def test_unknown_calling_ae_rejected_when_configured(server_factory) -> None:  # type: ignore[no-untyped-def]
    server = server_factory(
        "",
        peers=(("FRIEND", 4242),),
        server_toml="[ae]\naccept_unknown_calling_aes = false\n",
        name="strict",
    )
    stranger = _assoc(server.port, calling="STRANGER", contexts=[build_context(Verification)])
    assert stranger.is_rejected
    friend = _assoc(server.port, calling="FRIEND", contexts=[build_context(Verification)])
    assert friend.is_established
    assert friend.send_c_echo().Status == 0
    friend.release()


def test_duplicate_is_acknowledged_once(server: ServerProcess) -> None:
    """Policy 'ignore': the same SOP Instance twice is success both times, one file, one row."""
    ds = small_instance(StudySpec())
    ae = AE()
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
    first = assoc.send_c_store(ds)
    ds.SeriesDescription = "changed"
    second = assoc.send_c_store(ds)
    assoc.release()
    assert first.Status == 0 and second.Status == 0
    assert len(_stored_files(server)) == 1


def test_sigterm_shuts_down_cleanly(server: ServerProcess) -> None:
    assert echo(server.port)
    server.stop()
    assert server.proc is not None and server.proc.returncode == 0
    log = server.log()
    assert "shutting down" in log and "Traceback" not in log


def test_port_in_use_is_a_clear_error(server: ServerProcess, tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.helpers import ROOT, free_port, write_config

    def serve(dimse_port: int, http_port: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "server",
                "serve",
                "--config",
                str(write_config(tmp_path / "c")),
                "--data-dir",
                str(tmp_path / "d"),
                "--dimse-port",
                str(dimse_port),
                "--http-port",
                str(http_port),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )

    result = serve(server.port, free_port())
    assert result.returncode == 2
    assert f"cannot listen for DICOM on 0.0.0.0:{server.port}" in result.stderr
    result = serve(free_port(), server.http_port)
    assert result.returncode == 2
    assert f"cannot listen for HTTP on 127.0.0.1:{server.http_port}" in result.stderr


def test_duplicate_policy_replace(server_factory) -> None:  # type: ignore[no-untyped-def]
    """Policy 'replace': the second copy wins, even when it moved to another series; the old
    series disappears and the counters follow. One file, one row."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    server = server_factory("", server_toml='[storage]\nduplicates = "replace"\n', name="replace")
    ds = small_instance(StudySpec())
    old_series = ds.SeriesInstanceUID
    ae = AE()
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian])
    ae.add_requested_context(FIND)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
    assert assoc.send_c_store(ds).Status == 0
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesDescription = "corrected"
    assert assoc.send_c_store(ds).Status == 0
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = ds.StudyInstanceUID
    query.SeriesInstanceUID = ""
    query.NumberOfSeriesRelatedInstances = ""
    series = [r for s, r in assoc.send_c_find(query, FIND) if s.Status == 0xFF00]
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ds.StudyInstanceUID
    query.NumberOfStudyRelatedSeries = ""
    query.NumberOfStudyRelatedInstances = ""
    study = [r for s, r in assoc.send_c_find(query, FIND) if s.Status == 0xFF00]
    assoc.release()
    assert [r.SeriesInstanceUID for r in series] == [ds.SeriesInstanceUID] != [old_series]
    assert int(series[0].NumberOfSeriesRelatedInstances) == 1
    assert int(study[0].NumberOfStudyRelatedSeries) == 1
    assert int(study[0].NumberOfStudyRelatedInstances) == 1
    files = _stored_files(server)
    assert len(files) == 1
    assert dcmread(files[0]).SeriesDescription == "corrected"


def test_move_counts(server_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """C-MOVE reports completed and failed sub-operations (PS3.4 C.4.2.1.4): a destination that
    is listed but not listening fails them all."""
    from pydicom import dcmread
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    from tests.helpers import free_port, storescp

    good, dead, implicit = free_port(), free_port(), free_port()
    peers = (("GOOD", good), ("DEAD", dead), ("IMPLICIT", implicit))
    server = server_factory("", peers=peers, name="mover")
    spec = StudySpec()
    ae = AE()
    datasets = [small_instance(spec, number=n) for n in range(3)]
    ae.add_requested_context(datasets[0].SOPClassUID, [ExplicitVRLittleEndian])
    ae.add_requested_context(MOVE)
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = spec.study_uid
    with storescp(tmp_path / "moved", "GOOD", good):
        responses = list(assoc.send_c_move(query, "GOOD", MOVE))
    final = responses[-1][0]
    assert final.Status == 0x0000
    assert final.NumberOfCompletedSuboperations == 3
    assert [s.Status for s, _ in responses[:-1]] == [0xFF00] * 3
    moved = {str(dcmread(p).SOPInstanceUID): dcmread(p) for p in (tmp_path / "moved").iterdir()}
    assert {ds.SOPInstanceUID: ds.PixelData for ds in datasets} == {
        uid: ds.PixelData for uid, ds in moved.items()
    }
    # a destination that takes only Implicit VR: the stored Explicit VR files are converted
    with storescp(tmp_path / "implicit", "IMPLICIT", implicit, "+xi"):
        responses = list(assoc.send_c_move(query, "IMPLICIT", MOVE))
    assert responses[-1][0].Status == 0x0000
    converted = [dcmread(p) for p in (tmp_path / "implicit").iterdir()]
    assert len(converted) == 3
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in converted} == {"1.2.840.10008.1.2"}
    responses = list(assoc.send_c_move(query, "DEAD", MOVE))
    assoc.release()
    assert responses[-1][0].Status in (0xA801, 0xA702)  # destination unreachable
