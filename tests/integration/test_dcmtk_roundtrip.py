"""A modality sends with storescu, a viewer finds with findscu and pulls with movescu/getscu.

Runs on SQLite and PostgreSQL. DCMTK is the real peer on every step.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread

from tests.conftest import CT_SLICES
from tests.dcmtk import findscu, storescu
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
        result = run(
            [
                "movescu",
                "-S",
                "-v",
                "-aet",
                "MOVESCU",
                "-aec",
                "IMAGING",
                "-aem",
                "STORESCP",
                "-k",
                "QueryRetrieveLevel=SERIES",
                "-k",
                f"StudyInstanceUID={study_uid}",
                "-k",
                f"SeriesInstanceUID={series_uid}",
                "127.0.0.1",
                str(server.port),
            ]
        )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
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
    got.mkdir()
    result = run(
        [
            "getscu",
            "-S",
            "-aec",
            "IMAGING",
            "-od",
            str(got),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            f"StudyInstanceUID={study_uid}",
            "127.0.0.1",
            str(server.port),
        ],
        env={"TCP_NODELAY": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    files = list(got.iterdir())
    assert len(files) == CT_SLICES
    original = dcmread(next(ct_study.iterdir()))
    fetched = {dcmread(f).SOPInstanceUID: f for f in files}
    assert dcmread(fetched[original.SOPInstanceUID]).PixelData == original.PixelData


def test_compressed_transfer_syntaxes_are_kept(
    database_url: str, ct_study: Path, server_factory, tmp_path: Path
) -> None:
    """JPEG-LS and JPEG lossless copies (dcmcjpls, dcmcjpeg) keep the syntax they came in."""
    sources = sorted(ct_study.iterdir())[:4]
    compressed: dict[str, str] = {}
    for tool, ts in (
        ("dcmcjpls", "1.2.840.10008.1.2.4.80"),
        ("dcmcjpeg", "1.2.840.10008.1.2.4.70"),
    ):
        for n, src in enumerate(sources):
            dst = tmp_path / f"{tool}-{n}.dcm"
            result = run([tool, "+ua", str(src), str(dst)])
            assert result.returncode == 0, result.stderr
            ds = dcmread(dst, stop_before_pixels=True)
            assert ds.file_meta.TransferSyntaxUID == ts
            compressed[str(ds.SOPInstanceUID)] = ts
    server = server_factory(database_url)
    # storescu proposes uncompressed syntaxes unless told which compressed one to offer
    storescu(server.port, sorted(tmp_path.glob("dcmcjpls*.dcm")), "-R", "-xt")
    storescu(server.port, sorted(tmp_path.glob("dcmcjpeg*.dcm")), "-R", "-xs")
    stored = {}
    for path in (server.data_dir / "instances").rglob("*.dcm"):
        ds = dcmread(path, stop_before_pixels=True)
        stored[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
    assert stored == compressed
    rsps, _ = findscu(
        server.port, "IMAGE", {"StudyInstanceUID": _study_uid(ct_study), "SOPInstanceUID": ""}
    )
    assert {str(r.SOPInstanceUID) for r in rsps} == set(compressed)


def test_send_and_echo_commands(
    ct_study: Path, server_factory, tmp_path: Path, move_port: int
) -> None:
    """`python -m server send/echo` reach a peer from peers.toml."""
    import sys

    from tests.helpers import ROOT, write_config

    target = server_factory("", name="target")
    config = write_config(tmp_path / "sender-config", peers=(("TARGET", target.port),))
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
    assert ROOT.exists()
