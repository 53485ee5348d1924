"""Hand-encoded DIMSE pieces must equal what pynetdicom/pydicom produce."""

from __future__ import annotations

import io
from io import BytesIO

import pytest
from pydicom import dcmread
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE

from server.dimse.fastpath import part10, retrieve_pending_command, store_rsp_command
from server.dimse.retrieve import store_rq_command
from tools.generate import StudySpec, small_instance

CT = "1.2.840.10008.5.1.4.1.1.2"


def _command_bytes(message: object) -> bytes:
    pdatas = list(message.encode_msg(1, 0))  # type: ignore[attr-defined]
    return bytes(pdatas[0].presentation_data_value_list[0][1][1:])


def test_store_rsp_matches_pynetdicom() -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.45"
    primitive.Status = 0x0000
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    assert store_rsp_command(CT, "1.2.3.45", 7, 0) == _command_bytes(message)


def test_store_rq_matches_pynetdicom() -> None:
    primitive = C_STORE()
    primitive.MessageID = 12
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = "1.2.3.456"
    primitive.Priority = 2
    primitive.MoveOriginatorApplicationEntityTitle = "MOVESCU"
    primitive.MoveOriginatorMessageID = 3
    primitive.DataSet = BytesIO(b"\x08\x00\x18\x00\x00\x00\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    ours = store_rq_command(CT, "1.2.3.456", 12, 2, "MOVESCU", 3)
    assert ours == _command_bytes(message)


def test_part10_is_a_readable_file() -> None:
    ds = small_instance(StudySpec())
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    dataset = buf.getvalue()[132:]
    dataset = dataset[12 + int.from_bytes(dataset[8:12], "little") :]  # drop the original meta
    data = part10(ds.SOPClassUID, ds.SOPInstanceUID, "1.2.840.10008.1.2.1", "MODALITY", dataset)
    read = dcmread(io.BytesIO(data))
    assert read.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert read.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert read.file_meta.SourceApplicationEntityTitle == "MODALITY"
    assert read.PixelData == ds.PixelData and read.PatientName == ds.PatientName


@pytest.mark.parametrize(
    ("primitive_class", "message_class", "field"),
    [
        (C_MOVE, C_MOVE_RSP, 0x8021),
        (C_GET, C_GET_RSP, 0x8010),
    ],
)
def test_retrieve_pending_matches_pynetdicom(primitive_class, message_class, field) -> None:  # type: ignore[no-untyped-def]
    sop_class = "1.2.840.10008.5.1.4.1.2.2.2"
    primitive = primitive_class()
    primitive.MessageIDBeingRespondedTo = 5
    primitive.AffectedSOPClassUID = sop_class
    primitive.Status = 0xFF00
    primitive.NumberOfRemainingSuboperations = 297
    primitive.NumberOfCompletedSuboperations = 2
    primitive.NumberOfFailedSuboperations = 1
    primitive.NumberOfWarningSuboperations = 0
    message = message_class()
    message.primitive_to_message(primitive)
    ours = retrieve_pending_command(field, sop_class, 5, (297, 2, 1, 0))
    assert ours == _command_bytes(message)


def test_a_cancel_goes_the_ordinary_way() -> None:
    """C-CANCEL primitives (sent by an SCU) have no Affected SOP Class UID attribute: the
    fast path must leave them to pynetdicom instead of failing on them."""
    from pynetdicom.dimse_primitives import C_CANCEL

    from server.dimse.fastpath import _fast_command

    cancel = C_CANCEL()
    cancel.MessageIDBeingRespondedTo = 1
    assert _fast_command(cancel) is None
