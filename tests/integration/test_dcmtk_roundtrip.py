"""A modality sends with storescu, a viewer finds with findscu and pulls with movescu/getscu.

Runs on SQLite and PostgreSQL. DCMTK is the real peer on every step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import CT_SLICES
from tests.dcmtk import findscu, getscu, movescu, storescu
from tests.helpers import run, storescp

pytestmark = pytest.mark.usefixtures("dcmtk")


def _study_uid(ct_study: Path) -> str:
    return str(dcmread(next(ct_study.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def test_store_find_move_get(
    database_url: str, ct_study: Path, server_factory, move_port: int, tmp_path: Path
) -> None:
    server = server_factory(database_url, peers=(("STORESCP", move_port),))
    out = storescu(server.port, [ct_study], "+sd", "-v")
    assert out.count("Received Store Response (Success)") == CT_SLICES

    study_uid = _study_uid(ct_study)
    # PATIENT level (Patient Root)
    rsps, _ = findscu(
        server.port,
        "PATIENT",
        {"PatientID": "CT-PAT-1", "PatientName": "", "NumberOfPatientRelatedInstances": ""},
        model="-P",
    )
    assert len(rsps) == 1
    assert str(rsps[0].PatientName) == "LEWIS^ANNA"
    assert int(rsps[0].NumberOfPatientRelatedInstances) == CT_SLICES
    # STUDY level (Study Root): computed attributes
    rsps, _ = findscu(
        server.port,
        "STUDY",
        {
            "StudyInstanceUID": study_uid,
            "ModalitiesInStudy": "",
            "NumberOfStudyRelatedSeries": "",
            "NumberOfStudyRelatedInstances": "",
        },
    )
    assert len(rsps) == 1
    assert rsps[0].ModalitiesInStudy == "CT"
    assert int(rsps[0].NumberOfStudyRelatedSeries) == 1
    assert int(rsps[0].NumberOfStudyRelatedInstances) == CT_SLICES
    # only requested keys (plus level and unique keys) come back: PS3.4 C.4.1.2.2
    assert "StudyDescription" not in rsps[0]
    # SERIES level
    rsps, _ = findscu(
        server.port,
        "SERIES",
        {
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": "",
            "Modality": "",
            "NumberOfSeriesRelatedInstances": "",
        },
    )
    assert len(rsps) == 1 and rsps[0].Modality == "CT"
    assert int(rsps[0].NumberOfSeriesRelatedInstances) == CT_SLICES
    series_uid = rsps[0].SeriesInstanceUID
    # IMAGE level, with a key the catalog has no column for (answered from stored metadata)
    rsps, _ = findscu(
        server.port,
        "IMAGE",
        {
            "StudyInstanceUID": study_uid,
            "SeriesInstanceUID": series_uid,
            "SOPInstanceUID": "",
            "InstanceNumber": "",
            "KVP": "",
        },
    )
    assert len(rsps) == CT_SLICES
    assert sorted(int(r.InstanceNumber) for r in rsps) == list(range(1, CT_SLICES + 1))
    assert all(float(r.KVP) == 120 for r in rsps)

    # C-MOVE to a destination from peers.toml, with completed counts
    received = tmp_path / "moved"
    with storescp(received, port=move_port):
        log = movescu(
            server.port,
            "STORESCP",
            {
                "QueryRetrieveLevel": "SERIES",
                "StudyInstanceUID": study_uid,
                "SeriesInstanceUID": series_uid,
            },
            "-v",
            "-aet",
            "MOVESCU",
        )
    assert log.count("(Pending)") == CT_SLICES  # one pending response per sub-operation
    assert "Received Final Move Response (Success)" in log
    assert len(list(received.iterdir())) == CT_SLICES

    # unknown move destination: 0xA801
    result = run(
        [
            "movescu",
            "-S",
            "-aec",
            "IMAGING",
            "-aem",
            "NOWHERE",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            "127.0.0.1",
            str(server.port),
        ]
    )
    assert "MoveDestinationUnknown" in result.stdout + result.stderr

    # C-GET on the same association
    got = tmp_path / "got"
    getscu(server.port, study_uid, got)
    files = list(got.iterdir())
    assert len(files) == CT_SLICES
    original = dcmread(next(ct_study.iterdir()))
    fetched = {dcmread(f).SOPInstanceUID: f for f in files}
    assert dcmread(fetched[original.SOPInstanceUID]).PixelData == original.PixelData
    moved = {dcmread(f).SOPInstanceUID: f for f in received.iterdir()}
    assert dcmread(moved[original.SOPInstanceUID]).PixelData == original.PixelData

    # every access is in the audit trail: who, what, how many
    server.stop()
    import json

    audit = [json.loads(line) for line in (server.data_dir / "audit.log").read_text().splitlines()]
    actions = {(a["action"], a["actor"]) for a in audit}
    assert ("dimse.store", "STORESCU") in actions
    assert ("dimse.find", "FINDSCU") in actions
    assert ("dimse.move", "MOVESCU") in actions
    assert ("dimse.get", "GETSCU") in actions
    stores = [a for a in audit if a["action"] == "dimse.store"]
    assert sum(a["stored"] for a in stores) == CT_SLICES
    assert stores[0]["studies"] == [study_uid]
    move = next(a for a in audit if a["action"] == "dimse.move" and a["outcome"] == "ok")
    assert move["destination"] == "STORESCP" and move["instances"] == CT_SLICES
    assert move["keys"]["SeriesInstanceUID"] == series_uid


def _fake_j2k(src: Path, dst: Path) -> None:
    """A JPEG 2000 instance: ingest never decodes pixels, so opaque fragments will do (DCMTK
    3.6.7 has no JPEG 2000 encoder)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEG2000Lossless, generate_uid

    ds = dcmread(src)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(1000)])
    ds["PixelData"].VR = "OB"
    ds.save_as(dst, enforce_file_format=True)


# (how to make the copy, storescu's option to propose that syntax, the syntax)
SYNTAXES = [
    (["dcmcjpls", "+ua"], "-xt", "1.2.840.10008.1.2.4.80"),  # JPEG-LS lossless
    (["dcmcjpeg", "+ua"], "-xs", "1.2.840.10008.1.2.4.70"),  # JPEG lossless SV1 (process 14)
    (["dcmcjpeg", "+ua", "+eb"], "-xy", "1.2.840.10008.1.2.4.50"),  # JPEG baseline (8 bit)
    (["dcmcrle", "+ua"], "-xr", "1.2.840.10008.1.2.5"),  # RLE lossless
    (["dcmconv", "+td"], "-xd", "1.2.840.10008.1.2.1.99"),  # deflated explicit VR LE
    (["dcmconv", "+tb"], "-xb", "1.2.840.10008.1.2.2"),  # explicit VR big endian
    (None, "-xv", "1.2.840.10008.1.2.4.90"),  # JPEG 2000 lossless
]


def test_transfer_syntaxes_are_kept(
    database_url: str, ct_study: Path, server_factory, tmp_path: Path
) -> None:
    """Copies in the common transfer syntaxes are accepted and stored in the syntax they came in.

    storescu proposes uncompressed syntaxes unless told which compressed one to offer."""
    from pydicom.uid import generate_uid

    sources = sorted(ct_study.iterdir())[:3]
    server = server_factory(database_url)
    expected: dict[str, str] = {}
    for tool, option, syntax in SYNTAXES:
        folder = tmp_path / syntax
        folder.mkdir()
        for n, src in enumerate(sources):
            dst = folder / f"{n}.dcm"
            if tool is None:
                _fake_j2k(src, dst)
            else:
                if tool[0] == "dcmcjpeg" and "+eb" in tool:
                    ds8 = dcmread(src)  # baseline JPEG is 8-bit: make an 8-bit source
                    ds8.BitsAllocated, ds8.BitsStored, ds8.HighBit = 8, 8, 7
                    ds8.PixelData = bytes(len(ds8.PixelData) // 2)
                    src = folder / f"src{n}.dcm"
                    ds8.save_as(src)
                if tool[0] == "dcmconv":  # keeps UIDs: give the copy its own
                    ds = dcmread(src)
                    ds.SOPInstanceUID = generate_uid()
                    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                    src = folder / f"src{n}.dcm"
                    ds.save_as(src)
                result = run([*tool, str(src), str(dst)])
                assert result.returncode == 0, result.stderr
            ds = dcmread(dst, stop_before_pixels=True)
            assert ds.file_meta.TransferSyntaxUID == syntax
            expected[str(ds.SOPInstanceUID)] = syntax
        storescu(server.port, sorted(folder.glob("[0-9].dcm")), "-R", option)
    stored = {}
    for path in (server.data_dir / "instances").rglob("*.dcm"):
        ds = dcmread(path, stop_before_pixels=True)
        stored[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
    assert stored == expected
    rsps, _ = findscu(
        server.port, "IMAGE", {"StudyInstanceUID": _study_uid(ct_study), "SOPInstanceUID": ""}
    )
    assert {str(r.SOPInstanceUID) for r in rsps} == set(expected)


def test_send_and_echo_commands(
    ct_study: Path, server_factory, tmp_path: Path, move_port: int
) -> None:
    """`python -m server send/echo` reach a peer from peers.toml."""
    import sys

    from tests.helpers import ROOT, write_config

    target = server_factory("", name="target")
    second = server_factory("", name="second")
    peers = (("TARGET", target.port), ("SECOND", second.port))
    config = write_config(tmp_path / "sender-config", peers=peers)
    subset = tmp_path / "subset"
    subset.mkdir()
    for src in sorted(ct_study.iterdir())[:5]:
        shutil.copy(src, subset / src.name)
    base = [sys.executable, "-m", "server", "--config", str(config)]
    echo = run([*base, "echo", "TARGET"], timeout=60)
    assert echo.returncode == 0 and "0x0000" in echo.stdout, echo.stderr
    unknown = run([*base, "echo", "NOBODY"], timeout=60)
    assert unknown.returncode == 2 and "unknown AE" in unknown.stderr
    sent = run([*base, "send", "--to", "TARGET", str(subset)], timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert "5 sent, 0 failed" in sent.stdout
    rsps, _ = findscu(
        target.port, "IMAGE", {"StudyInstanceUID": _study_uid(ct_study), "SOPInstanceUID": ""}
    )
    assert len(rsps) == 5
    # by UID, from the sender's own archive
    own = ["--data-dir", str(tmp_path / "sender-data")]
    imported = run([*base, "import", *own, str(subset)], timeout=120)
    assert imported.returncode == 0, imported.stderr
    sent = run([*base, "send", *own, "--to", "SECOND", _study_uid(ct_study)], timeout=120)
    assert sent.returncode == 0 and "5 sent, 0 failed" in sent.stdout, sent.stderr
    rsps, _ = findscu(
        second.port, "IMAGE", {"StudyInstanceUID": _study_uid(ct_study), "SOPInstanceUID": ""}
    )
    assert len(rsps) == 5
    missing = run([*base, "send", *own, "--to", "SECOND", "1.2.3.4.5.6"], timeout=120)
    assert missing.returncode == 1 and "no stored study" in missing.stderr
    assert ROOT.exists()
