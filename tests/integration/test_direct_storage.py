"""Storage-only associations are served by server/dimse/storage_scp.py, everything else by
pynetdicom: both with the same identity, results and error handling.  Malformed traffic on a
direct association gets an A-ABORT and the server keeps serving."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from server.dicom.uids import IMPLEMENTATION_CLASS_UID
from tests.dcmtk import findscu, storescu
from tests.helpers import ServerProcess, have, wait_for, write_config
from tools.generate import StudySpec, ct_series, write

pytestmark = [pytest.mark.dcmtk]
TOML = '[ae]\ntitle = "IMAGING"\n[timeouts]\nnetwork = 2\n'


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    if not have("storescu"):
        pytest.skip("DCMTK is not installed (tools/test installs it when run as root)")
    proc = ServerProcess(tmp_path / "data", write_config(tmp_path / "cfg", server=TOML))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def ct(tmp_path: Path) -> list[Path]:
    for ds in ct_series(StudySpec(patient_id="DIRECT-1"), 6, 64):
        write(ds, tmp_path / "ct")
    return sorted((tmp_path / "ct").iterdir())


def _scu(*contexts: str) -> AE:
    ae = AE(ae_title="DIRECTSCU")
    for uid in contexts:
        ae.add_requested_context(uid)
    ae.network_timeout = 10
    return ae


def test_storescu_is_served_directly(server: ServerProcess, ct: list[Path]) -> None:
    storescu(server.port, ct, "-aet", "MODALITY1")
    assert "storage association from MODALITY1" in server.log_text()
    found, _ = findscu(server.port, "IMAGE", {"PatientID": "DIRECT-1", "SOPInstanceUID": ""})
    sent = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in ct}
    assert {str(r.SOPInstanceUID) for r in found} == sent


def test_both_paths_answer_with_one_identity(server: ServerProcess, ct: list[Path]) -> None:
    """A storage-only association (direct) and one that also proposes C-FIND (pynetdicom)."""
    ds = dcmread(ct[0])
    for contexts, direct in (
        ((CTImageStorage,), True),
        ((CTImageStorage, StudyRootQueryRetrieveInformationModelFind), False),
    ):
        before = server.log_text().count("storage association from DIRECTSCU")
        assoc = _scu(*contexts).associate("127.0.0.1", server.port, ae_title="IMAGING")
        assert assoc.is_established
        try:
            assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
            status = assoc.send_c_store(ds)
            assert status.Status == 0x0000
            if not direct:
                query = dcmread(ct[0], stop_before_pixels=True)
                identifier = Dataset()
                identifier.QueryRetrieveLevel = "STUDY"
                identifier.StudyInstanceUID = query.StudyInstanceUID
                answers = list(
                    assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind)
                )
                assert answers[0][0].Status == 0xFF00
        finally:
            assoc.release()
        after = server.log_text().count("storage association from DIRECTSCU")
        assert after == before + (1 if direct else 0)


def test_refusals_carry_their_status_and_comment(server: ServerProcess, ct: list[Path]) -> None:
    ds = dcmread(ct[1])
    del ds.StudyInstanceUID
    scu = _scu(CTImageStorage, Verification)
    assoc = scu.associate("127.0.0.1", server.port, ae_title="IMAGING")
    try:
        status = assoc.send_c_store(ds)
        assert status.Status == 0xA900
        assert "StudyInstanceUID" in str(status.ErrorComment)
        assert assoc.send_c_echo().Status == 0x0000  # the association carries on
    finally:
        assoc.release()


def _raw(assoc: object, data: bytes) -> None:
    assoc.dul.socket.socket.sendall(data)  # type: ignore[attr-defined]


def _pdata(context_id: int, control: int, fragment: bytes) -> bytes:
    item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBI", 0x04, 0, len(item)) + item


def _find_command() -> bytes:
    def element(tag: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0, tag, len(value)) + value

    body = b"".join(
        (
            element(0x0002, b"1.2.840.10008.5.1.4.1.2.2.1\0"),
            element(0x0100, struct.pack("<H", 0x0020)),
            element(0x0110, struct.pack("<H", 7)),
            element(0x0700, struct.pack("<H", 0)),
            element(0x0800, struct.pack("<H", 0x0101)),
        )
    )
    return element(0x0000, struct.pack("<I", len(body))) + body


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(lambda cid: _pdata(cid, 0x03, _find_command()), id="c-find-on-storage"),
        pytest.param(lambda cid: _pdata(cid + 2, 0x03, _find_command()), id="unknown-context"),
        pytest.param(lambda cid: _pdata(cid, 0x00, b"\x08\x00"), id="data-without-command"),
        pytest.param(lambda cid: b"\x09\x00\x00\x00\x00\x02ab", id="unknown-pdu-type"),
        pytest.param(lambda cid: _pdata(cid, 0x03, b"\x00\x00\x00"), id="garbled-command"),
    ],
)
def test_malformed_traffic_is_aborted(server: ServerProcess, payload: object) -> None:
    assoc = _scu(CTImageStorage).associate("127.0.0.1", server.port, ae_title="IMAGING")
    assert assoc.is_established
    context_id = assoc.accepted_contexts[0].context_id
    _raw(assoc, payload(context_id))  # type: ignore[operator]
    wait_for(lambda: assoc.is_aborted, "the server's A-ABORT", 15)
    wait_for(lambda: "aborting" in server.log_text(), "the reason in the server log", 15)
    # ... and the next association is served as usual.
    again = _scu(CTImageStorage).associate("127.0.0.1", server.port, ae_title="IMAGING")
    assert again.is_established
    again.release()


def test_an_idle_association_is_aborted(server: ServerProcess) -> None:
    """[timeouts] network (2 s here): an association that sends nothing is ended."""
    assoc = _scu(CTImageStorage).associate("127.0.0.1", server.port, ae_title="IMAGING")
    assert assoc.is_established
    wait_for(lambda: assoc.is_aborted, "the idle association to be aborted", 15)
    assert "idle too long" in server.log_text()
