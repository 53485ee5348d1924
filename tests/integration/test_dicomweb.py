"""DICOMweb (QIDO-RS, WADO-RS, STOW-RS) against a running server, with dicomweb-client as the
real client and plain HTTP (httpx) where the exact wire form matters."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from tests.dcmtk import findscu, storescu
from tests.helpers import (
    ServerProcess,
    catalog,
    free_port,
    have,
    part10,
    run,
    storescp,
)
from tests.helpers import write_config as make_config
from tools.generate import StudySpec, ct_series, small_instance, uid, write
from tools.procs import stow_body

pytestmark = pytest.mark.dcmtk


@dataclass
class Archive:
    server: ServerProcess
    client: DICOMwebClient
    http: httpx.Client
    ct: StudySpec
    ct_files: list[Path]
    others: list[StudySpec]
    move_port: int

    @property
    def root(self) -> str:
        return self.server.dicomweb


def _study_files(tmp: Path) -> tuple[StudySpec, list[Path], list[StudySpec], list[Path]]:
    ct = StudySpec(patient_id="WEB-P1", patient_name="LEWIS^ANNA", accession="WACC1")
    ct_files = [write(ds, tmp / "ct") for ds in ct_series(ct, 6, 64)]
    others = [
        StudySpec(
            patient_id="WEB-P2",
            patient_name="LEWANDOWSKI^PIOTR",
            study_date="20230101",
            accession="WACC2",
            description="HEAD",
        ),
        StudySpec(
            patient_id="WEB-P3",
            patient_name="SMITH^JO",
            study_date="20220505",
            accession="WACC3",
            description="KNEE",
        ),
    ]
    other_files = []
    for i, spec in enumerate(others):
        series_uid = uid()
        for n in (1, 2):
            other_files.append(write(small_instance(spec, series_uid, n), tmp / f"other{i}"))
    return ct, ct_files, others, other_files


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def archive(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Archive]:
    if not have("storescu"):
        pytest.skip("DCMTK is not installed (tools/test installs it when run as root)")
    tmp = tmp_path_factory.mktemp(f"dicomweb-{request.param}")
    with catalog(request.param) as url:
        move_port = free_port()
        config = make_config(tmp / "config", peers=[("MOVEDEST", move_port)])
        server = ServerProcess(tmp / "data", config, url).start()
        try:
            ct, ct_files, others, other_files = _study_files(tmp)
            # Stored over DIMSE: everything below also proves C-STORE -> QIDO/WADO.
            storescu(server.port, [*ct_files, *other_files])
            with httpx.Client(base_url=server.dicomweb, timeout=60) as http:
                yield Archive(
                    server, DICOMwebClient(server.dicomweb), http, ct, ct_files, others, move_port
                )
        finally:
            server.stop()


def _value(item: dict[str, object], tag: str) -> object:
    element = item.get(tag)
    assert isinstance(element, dict), f"{tag} missing from {item}"
    values = element.get("Value")
    return values[0] if isinstance(values, list) and values else None


# --- QIDO-RS ---------------------------------------------------------------------------------


def test_qido_studies_by_keyword_tag_and_percent_encoded_wildcard(archive: Archive) -> None:
    found = archive.client.search_for_studies(search_filters={"PatientID": "WEB-P1"})
    assert [_value(s, "0020000D") for s in found] == [archive.ct.study_uid]
    study = found[0]
    assert _value(study, "00100010") == {"Alphabetic": "LEWIS^ANNA"}
    assert _value(study, "00080061") == "CT"  # ModalitiesInStudy, computed
    assert _value(study, "00201206") == 1  # NumberOfStudyRelatedSeries
    assert _value(study, "00201208") == 6  # NumberOfStudyRelatedInstances
    assert _value(study, "00081190") == f"{archive.root}/studies/{archive.ct.study_uid}"

    by_tag = archive.http.get("/studies?00100020=WEB-P2").json()
    assert [_value(s, "00100020") for s in by_tag] == ["WEB-P2"]

    # LEW%2A is LEW* once decoded: both LEWIS and LEWANDOWSKI, not SMITH.
    response = archive.http.get("/studies?PatientName=LEW%2A")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/dicom+json")
    names = sorted(_value(s, "00100010")["Alphabetic"] for s in response.json())  # type: ignore[index]
    assert names == ["LEWANDOWSKI^PIOTR", "LEWIS^ANNA"]


def test_qido_ranges_lists_and_includefield_forms(archive: Archive) -> None:
    dated = archive.http.get("/studies?StudyDate=20220101-20231231").json()
    assert sorted(_value(s, "00080050") for s in dated) == ["WACC2", "WACC3"]  # type: ignore[type-var]

    uid_list = f"{archive.ct.study_uid},{archive.others[1].study_uid}"
    listed = archive.http.get(f"/studies?StudyInstanceUID={uid_list}").json()
    assert len(listed) == 2

    # OHIF sends includefield as one comma-separated (percent-encoded) list.
    ohif = archive.http.get(
        "/studies?PatientID=WEB-P1&includefield=00081030%2C00080060%2C00080090%2C00100030"
    ).json()[0]
    assert _value(ohif, "00081030") == "CT CHEST"
    assert "00100030" in ohif  # PatientBirthDate
    repeated = archive.http.get(
        f"/studies/{archive.ct.study_uid}/series?includefield=0008103E&includefield=00200011"
    ).json()
    assert _value(repeated[0], "0008103E") == "AXIAL 1.0"
    # A key the catalog has no column for comes from the stored header.
    with_kvp = archive.http.get(
        f"/studies/{archive.ct.study_uid}/instances?includefield=00180060&limit=1"
    ).json()
    assert float(_value(with_kvp[0], "00180060")) == 120.0  # type: ignore[arg-type]
    everything = archive.http.get(
        f"/studies/{archive.ct.study_uid}/instances?includefield=all&limit=1"
    ).json()[0]
    assert _value(everything, "00080070") == "SYNTHETIC"  # Manufacturer


def test_qido_limit_offset_and_warnings(archive: Archive) -> None:
    first = archive.http.get("/studies?limit=2&offset=0")
    assert len(first.json()) == 2
    assert "299" in first.headers.get("warning", "")  # three studies: the result was cut
    rest = archive.http.get("/studies?limit=2&offset=2")
    assert len(rest.json()) == 1
    assert "warning" not in rest.headers
    seen = {_value(s, "0020000D") for s in first.json() + rest.json()}
    assert len(seen) == 3
    fuzzy = archive.http.get("/studies?PatientName=LEWIS&fuzzymatching=true")
    assert fuzzy.status_code == 200
    assert "fuzzymatching" in fuzzy.headers["warning"]


def test_qido_series_and_instances_levels(archive: Archive) -> None:
    series = archive.client.search_for_series(archive.ct.study_uid)
    assert len(series) == 1
    assert _value(series[0], "00080060") == "CT"
    assert _value(series[0], "00201209") == 6  # NumberOfSeriesRelatedInstances
    series_uid = str(_value(series[0], "0020000E"))
    instances = archive.client.search_for_instances(archive.ct.study_uid, series_uid)
    assert len(instances) == 6
    assert {_value(i, "00280010") for i in instances} == {64}  # Rows, from stored metadata
    everywhere = archive.http.get("/series?Modality=OT").json()
    assert len(everywhere) == 2
    all_instances = archive.http.get("/instances?PatientID=WEB-P3").json()
    assert len(all_instances) == 2
    # Modality at study level means ModalitiesInStudy.
    assert len(archive.http.get("/studies?Modality=CT").json()) == 1


def test_qido_bad_requests_answer_400_with_a_reason(archive: Archive) -> None:
    for query in (
        "/studies?NoSuchKeyword=1",
        "/studies?limit=-1",
        "/studies?StudyDate=-",
        "/studies?SeriesDescription=X",
        "/studies?fuzzymatching=maybe",
    ):
        response = archive.http.get(query)
        assert response.status_code == 400, query
        assert response.json()["error"]["message"]
    assert archive.http.get("/studies?limit=1").status_code == 200  # still serving


# --- WADO-RS ---------------------------------------------------------------------------------


def _ct_series_uid(archive: Archive) -> str:
    return str(dcmread(archive.ct_files[0]).SeriesInstanceUID)


def test_wado_retrieves_study_as_stored(archive: Archive) -> None:
    datasets = archive.client.retrieve_study(archive.ct.study_uid)
    assert len(datasets) == 6
    originals = {dcmread(p).SOPInstanceUID: dcmread(p) for p in archive.ct_files}
    for ds in datasets:
        original = originals[ds.SOPInstanceUID]
        assert ds.PixelData == original.PixelData
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    series = archive.client.retrieve_series(archive.ct.study_uid, _ct_series_uid(archive))
    assert len(series) == 6


@pytest.mark.parametrize(
    "syntax", [ExplicitVRLittleEndian, JPEGLSLossless, JPEG2000Lossless, RLELossless]
)
def test_wado_transcodes_to_a_requested_syntax(archive: Archive, syntax: str) -> None:
    original = dcmread(archive.ct_files[2])
    ds = archive.client.retrieve_instance(
        archive.ct.study_uid,
        original.SeriesInstanceUID,
        original.SOPInstanceUID,
        media_types=(("application/dicom", syntax),),
    )
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.SOPInstanceUID == original.SOPInstanceUID  # the same instance, re-encoded
    assert np.array_equal(ds.pixel_array, original.pixel_array)  # lossless


def test_wado_transcoded_objects_validate_like_the_original(
    archive: Archive, tmp_path: Path
) -> None:
    if shutil.which("dciodvfy") is None:
        pytest.skip("dicom3tools is not installed (tools/test installs it when run as root)")
    original = dcmread(archive.ct_files[1])
    url = (
        f"/studies/{archive.ct.study_uid}/series/{original.SeriesInstanceUID}"
        f"/instances/{original.SOPInstanceUID}"
    )

    def errors(path: Path) -> set[str]:
        out = run(["dciodvfy", "-new", str(path)])
        lines = (out.stdout + out.stderr).splitlines()
        return {line.split(" - ", 1)[-1] for line in lines if line.startswith("Error")}

    baseline = errors(archive.ct_files[1])
    for syntax in (JPEGLSLossless, ImplicitVRLittleEndian):
        response = archive.http.get(
            url,
            headers={
                "Accept": f'multipart/related; type="application/dicom"; transfer-syntax={syntax}'
            },
        )
        assert response.status_code == 200
        body = _parts(response)[0][1]
        path = tmp_path / f"{syntax}.dcm"
        path.write_bytes(body)
        assert errors(path) <= baseline, f"transcoding to {syntax} added dciodvfy errors"


def test_wado_refuses_an_unproducible_syntax_with_406(archive: Archive) -> None:
    response = archive.http.get(
        f"/studies/{archive.ct.study_uid}",
        headers={
            "Accept": 'multipart/related; type="application/dicom"; '
            "transfer-syntax=1.2.840.10008.1.2.4.50"
        },
    )
    assert response.status_code == 406
    assert "cannot be sent" in response.json()["error"]["message"]
    pdf = archive.http.get(
        f"/studies/{archive.ct.study_uid}", headers={"Accept": "application/pdf"}
    )
    assert pdf.status_code == 406


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """Split a multipart/related body into (content type, payload) pairs."""
    content_type = response.headers["content-type"]
    boundary = content_type.split("boundary=")[1].split(";")[0].strip('"')
    out = []
    for chunk in response.content.split(f"--{boundary}".encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk.partition(b"\r\n\r\n")
        part_type = ""
        for line in head.decode().split("\r\n"):
            if line.lower().startswith("content-type:"):
                part_type = line.split(":", 1)[1].strip()
        out.append((part_type, body.removesuffix(b"\r\n")))
    return out


def test_wado_metadata_has_bulk_data_uris(archive: Archive) -> None:
    series_uid = _ct_series_uid(archive)
    metadata = archive.client.retrieve_series_metadata(archive.ct.study_uid, series_uid)
    assert len(metadata) == 6
    first = metadata[0]
    assert _value(first, "00100010") == {"Alphabetic": "LEWIS^ANNA"}
    assert _value(first, "00180060") == 120  # KVP as DS
    pixel = first["7FE00010"]
    assert pixel["BulkDataURI"].startswith(f"{archive.root}/studies/{archive.ct.study_uid}/")
    # The URI leads to the pixel data of that very instance.
    bulk = archive.client.retrieve_bulkdata(pixel["BulkDataURI"])
    originals = {dcmread(p).SOPInstanceUID: dcmread(p) for p in archive.ct_files}
    assert bulk[0] == originals[_value(first, "00080018")].PixelData
    study_meta = archive.client.retrieve_study_metadata(archive.ct.study_uid)
    assert len(study_meta) == 6
    gz = archive.http.get(
        f"/studies/{archive.ct.study_uid}/metadata", headers={"Accept-Encoding": "gzip"}
    )
    assert gz.headers.get("content-encoding") == "gzip"
    assert len(gz.json()) == 6


def test_wado_frames_in_each_media_type(archive: Archive) -> None:
    original = dcmread(archive.ct_files[3])
    study, series, sop = archive.ct.study_uid, original.SeriesInstanceUID, original.SOPInstanceUID
    frames = archive.client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
    assert frames[0] == original.PixelData
    url = f"/studies/{study}/series/{series}/instances/{sop}/frames/1"
    # OHIF's Accept: whatever is stored.
    ohif = archive.http.get(
        url,
        headers={"Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*"},
    )
    assert ohif.status_code == 200
    assert _parts(ohif)[0] == (
        f"application/octet-stream; transfer-syntax={ExplicitVRLittleEndian}",
        original.PixelData,
    )
    for media, syntax in (("image/jls", JPEGLSLossless), ("image/jp2", JPEG2000Lossless)):
        response = archive.http.get(url, headers={"Accept": f'multipart/related; type="{media}"'})
        assert response.status_code == 200, response.text
        part_type, data = _parts(response)[0]
        assert part_type == f"{media}; transfer-syntax={syntax}"
        from pydicom.pixels.decoders.base import get_decoder

        decoded = get_decoder(syntax).as_array(_encapsulated_like(original, syntax, data), index=0)[
            0
        ]
        assert np.array_equal(decoded, original.pixel_array)
    missing = archive.http.get(url.replace("frames/1", "frames/7"))
    assert missing.status_code == 404
    bad = archive.http.get(url.replace("frames/1", "frames/x"))
    assert bad.status_code == 400


def _encapsulated_like(original: Dataset, syntax: str, frame: bytes) -> Dataset:
    from pydicom.encaps import encapsulate

    ds = Dataset()
    for keyword in (
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
        "PhotometricInterpretation",
    ):
        setattr(ds, keyword, original[keyword].value)
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    from pydicom.dataset import FileMetaDataset

    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def test_wado_rendered_and_thumbnails(archive: Archive) -> None:
    original = dcmread(archive.ct_files[3])
    study, series, sop = archive.ct.study_uid, original.SeriesInstanceUID, original.SOPInstanceUID
    instance = f"/studies/{study}/series/{series}/instances/{sop}"
    jpeg = archive.http.get(f"{instance}/rendered", headers={"Accept": "image/jpeg"})
    assert jpeg.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(jpeg.content))
    assert image.size == (64, 64)
    png = archive.http.get(f"{instance}/rendered?window=40,400&viewport=32,32&accept=image/png")
    assert png.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(io.BytesIO(png.content)))
    assert pixels.shape == (32, 32) and pixels.max() > pixels.min()  # not a blank image
    narrow = archive.http.get(f"{instance}/rendered?window=1300,10&accept=image/png")
    windowed = np.asarray(Image.open(io.BytesIO(narrow.content)))
    assert not np.array_equal(
        windowed,
        np.asarray(
            Image.open(
                io.BytesIO(archive.http.get(f"{instance}/rendered?accept=image/png").content)
            )
        ),
    )  # the query's window overrides the dataset's
    for path in (
        f"/studies/{study}/thumbnail",
        f"/studies/{study}/series/{series}/thumbnail",
        f"{instance}/thumbnail",
    ):
        thumb = archive.http.get(path, headers={"Accept": "image/jpeg"})
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 128
    series_rendered = archive.http.get(f"/studies/{study}/series/{series}/rendered")
    assert len(_parts(series_rendered)) == 6
    assert (
        archive.http.get(
            f"{instance}/rendered?window=1", headers={"Accept": "image/png"}
        ).status_code
        == 400
    )
    assert (
        archive.http.get(f"{instance}/rendered", headers={"Accept": "video/mp4"}).status_code == 406
    )


def test_wado_unknown_resources_answer_404(archive: Archive) -> None:
    fake = uid()
    for path in (
        f"/studies/{fake}",
        f"/studies/{fake}/metadata",
        f"/studies/{archive.ct.study_uid}/series/{fake}",
        f"/studies/{archive.ct.study_uid}/series/{fake}/instances/{fake}/frames/1",
        "/studies/../../etc/passwd/metadata",
        "/no/such/route",
    ):
        response = archive.http.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "NOT_FOUND"


# --- STOW-RS ---------------------------------------------------------------------------------


_multipart = stow_body


def test_stow_stores_and_cfind_and_cmove_see_it(archive: Archive, tmp_path: Path) -> None:
    spec = StudySpec(patient_id="STOW-P1", patient_name="STOWED^ONE", accession="SACC1")
    datasets = list(ct_series(spec, 3, 32))
    result = archive.client.store_instances(datasets, spec.study_uid)
    stored = result.ReferencedSOPSequence
    assert {item.ReferencedSOPInstanceUID for item in stored} == {
        d.SOPInstanceUID for d in datasets
    }
    assert "FailedSOPSequence" not in result
    # Found by C-FIND (DCMTK findscu) ...
    found, log = findscu(
        archive.server.port, "STUDY", {"PatientID": "STOW-P1", "StudyInstanceUID": ""}
    )
    assert [str(d.StudyInstanceUID) for d in found] == [spec.study_uid], log
    # ... and pulled by C-MOVE to a DCMTK storescp.
    received = tmp_path / "moved"
    with storescp(received, "MOVEDEST", archive.move_port):
        out = run(
            [
                "movescu",
                "-S",
                "-aec",
                "IMAGING",
                "-aem",
                "MOVEDEST",
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={spec.study_uid}",
                "127.0.0.1",
                str(archive.server.port),
            ],
            env={"TCP_NODELAY": "1"},
        )
        assert out.returncode == 0, out.stderr
    assert len(list(received.rglob("*"))) == 3


def test_stow_partial_failure_and_status_codes(archive: Archive) -> None:
    spec = StudySpec(patient_id="STOW-P2", patient_name="STOWED^TWO")
    good = small_instance(spec)
    other_study = small_instance(StudySpec(patient_id="STOW-P3"))
    body, content_type = _multipart(
        [part10(good), b"this is not DICOM at all", part10(other_study)]
    )
    response = archive.http.post(
        f"/studies/{spec.study_uid}",
        content=body,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
    )
    assert response.status_code == 202, response.text
    payload = response.json()
    referenced = payload["00081199"]["Value"]
    assert [_value(r, "00081155") for r in referenced] == [good.SOPInstanceUID]
    failed = payload["00081198"]["Value"]
    reasons = sorted(_value(f, "00081197") for f in failed)  # type: ignore[type-var]
    assert reasons == [0xA900, 0xC000]
    mismatched = next(f for f in failed if _value(f, "00081197") == 0xA900)
    assert _value(mismatched, "00081155") == other_study.SOPInstanceUID
    # the mismatching instance was not stored; the good one was
    assert archive.http.get(f"/studies/{other_study.StudyInstanceUID}/metadata").status_code == 404
    assert archive.http.get(f"/studies/{spec.study_uid}/metadata").status_code == 200

    nothing, content_type = _multipart([b"garbage one", b"garbage two"])
    none_stored = archive.http.post(
        "/studies", content=nothing, headers={"Content-Type": content_type}
    )
    assert none_stored.status_code == 409
    assert len(none_stored.json()["00081198"]["Value"]) == 2

    wrong_type = archive.http.post(
        "/studies", content=b"{}", headers={"Content-Type": "application/json"}
    )
    assert wrong_type.status_code == 415
    no_boundary = archive.http.post(
        "/studies",
        content=b"x",
        headers={"Content-Type": 'multipart/related; type="application/dicom"'},
    )
    assert no_boundary.status_code == 400
    truncated = archive.http.post(
        "/studies", content=body[:200], headers={"Content-Type": content_type}
    )
    assert truncated.status_code == 400
    assert archive.http.get("/studies?limit=1").status_code == 200  # still serving


def test_stow_of_many_parts_streams_each_through_ingest(archive: Archive) -> None:
    spec = StudySpec(patient_id="STOW-P4", patient_name="STOWED^MANY")
    datasets = list(ct_series(spec, 20, 128))
    body, content_type = _multipart([part10(d) for d in datasets], "b" * 40)

    def chunks() -> Iterator[bytes]:  # a streamed request body in odd-sized pieces
        for start in range(0, len(body), 7919):
            yield body[start : start + 7919]

    response = archive.http.post(
        "/studies", content=chunks(), headers={"Content-Type": content_type}
    )
    assert response.status_code == 200, response.text
    assert len(response.json()["00081199"]["Value"]) == 20
    metadata = archive.client.retrieve_study_metadata(spec.study_uid)
    assert len(metadata) == 20


def test_stow_flags_nonconformant_instances_but_stores_them(archive: Archive) -> None:
    spec = StudySpec(patient_id="STOW-WARN", patient_name="ODD^ONE")
    odd = small_instance(spec)
    del odd.PatientSex  # Type 2: must be present, even empty
    odd.HighBit = 3  # inconsistent with BitsStored 8
    body, content_type = _multipart([part10(odd)])
    response = archive.http.post("/studies", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 202, response.text
    item = response.json()["00081199"]["Value"][0]
    assert _value(item, "00081196") == 0xB007
    assert "PatientSex" in response.headers["warning"]
    assert archive.http.get(f"/studies/{spec.study_uid}/metadata").status_code == 200
