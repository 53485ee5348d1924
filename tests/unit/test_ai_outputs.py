"""The AI worker's path after inference, with the phantom's ground truth as the "model":
measurements, the SEG and SR it stores (dciodvfy), their order, the derived-object index, and
what a broken series does.  The trained model itself is tested end to end in
tests/integration/test_ai_loop.py."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import orjson
import pytest
from pydicom import dcmread

from server.ai import jobs
from server.ai.analysis import findings, suggest_pi_rads
from server.ai.models import Segmenter
from server.ai.volume import BrokenSeries, load_series
from server.ai.worker import Worker
from server.archive import Archive
from server.catalog.db import session
from server.catalog.schema import Instance, Segmentation, Series
from server.catalog.search import search
from server.dicom.attributes import Level
from server.dicom.query import parse_qido
from tools.phantom import Phantom, make_phantom, write_series

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(11, n_lesions=2)


def oracle(phantom: Phantom) -> Segmenter:
    """A "model" that answers the phantom's truth, as one-hot probabilities."""

    def run(volume: np.ndarray[Any, Any], *_: Any) -> np.ndarray[Any, Any]:
        assert volume.shape == phantom.labels.shape
        probabilities = np.zeros((4, *volume.shape), np.float32)
        for label in range(4):
            probabilities[label][phantom.labels == label] = 1.0
        return probabilities

    return Segmenter("oracle", "1", "cpu", run)


def _store(archive: Archive, phantom: Phantom, folder: Path, **kwargs: Any) -> str:
    files = write_series(phantom, folder, shuffle=True, **kwargs)
    for path in files:
        archive.ingestor.ingest(path.read_bytes(), source="test")
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)


def _run_job(archive: Archive, phantom: Phantom, series_uid: str, **config: Any) -> Any:
    with session():
        study = Series.get(Series.series_instance_uid == series_uid).study.study_instance_uid
    job_id = jobs.enqueue(
        series_uid,
        study,
        None,
        version="test",
        trigger="api",
        max_attempts=1,
        config={"config": config},
    )
    Worker(archive, oracle(phantom)).run_once()
    return jobs.get(job_id)


def test_measurements_match_the_phantom(phantom: Phantom) -> None:
    probabilities = np.zeros((4, *phantom.labels.shape), np.float32)
    for label in range(4):
        probabilities[label][phantom.labels == label] = 1.0
    found = findings(probabilities, phantom.spacing, [1, 0, 0, 0, 1, 0], psa=6.0)
    voxel_ml = float(np.prod(phantom.spacing)) / 1000
    assert found.gland.volume_ml == pytest.approx((phantom.labels > 0).sum() * voxel_ml)
    assert sum(z.volume_ml for z in found.zones) == pytest.approx(found.gland.volume_ml)
    assert found.psa_density == pytest.approx(6.0 / found.gland.volume_ml)
    assert len(found.lesions) == len(phantom.lesions) == 2
    truth = sorted(phantom.lesions, key=lambda lesion: -lesion.volume_ml)
    gland_x = np.argwhere(phantom.labels > 0)[:, 2].mean()
    for lesion, expected in zip(found.lesions, truth, strict=True):
        assert lesion.volume_ml == pytest.approx(expected.volume_ml, rel=1e-6)
        assert lesion.zone == f"{expected.zone}_zone"
        # Column index grows towards the patient's left (ImageOrientationPatient 1,0,0,0,1,0).
        side = "left" if expected.center_zyx[2] > gland_x else "right"
        assert f"_{side}_" in (lesion.location or "")
        assert lesion.pi_rads == suggest_pi_rads(lesion.diameter_mm)


def test_pi_rads_suggestion_follows_size() -> None:
    assert [suggest_pi_rads(d) for d in (3, 5, 9.9, 10, 14.9, 15, 30)] == [2, 3, 3, 4, 4, 5, 5]


def test_job_stores_a_valid_seg_and_sr_in_position_order(
    archive: Archive, phantom: Phantom, tmp_path: Path
) -> None:
    series_uid = _store(archive, phantom, tmp_path / "in")
    job = _run_job(archive, phantom, series_uid, psa=5.0)
    assert job.status == jobs.COMPLETED, job.error
    result = orjson.loads(job.result)
    assert [s["region_type"] for s in result["segmentations"]] == [
        "prostate",
        "peripheral_zone",
        "transition_zone",
        "lesion",
        "lesion",
    ]
    assert result["metrics"]["total_lesions"] == 2
    assert result["metrics"]["prostate_psa_density"] > 0
    with session():
        seg_row = Instance.get(Instance.sop_class_uid == SEG_CLASS)
        sr_row = Instance.get(Instance.sop_class_uid == SR_CLASS)
        sources = [
            (float(orjson.loads(i.metadata)["00200032"]["Value"][2]), i.sop_instance_uid)
            for i in Instance.select().join(Series).where(Series.series_instance_uid == series_uid)
        ]
    seg_path = archive.storage.path_of(seg_row.file_path)
    sr_path = archive.storage.path_of(sr_row.file_path)
    if shutil.which("dciodvfy"):
        for path in (seg_path, sr_path):
            out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
            errors = [x for x in (out.stdout + out.stderr).splitlines() if x.startswith("Error")]
            assert errors == [], errors
    # Frames map to the source slices by position, whatever order the files came in.
    ordered = [uid for _, uid in sorted(sources)]
    seg = hd.seg.segread(seg_path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=ordered, segment_numbers=[1, 2, 3]
    )
    assert np.array_equal(pixels[..., 0] != 0, phantom.labels > 0)
    assert "AI" in seg.SeriesDescription and seg.ContentDescription.startswith("AI-generated")
    sr = dcmread(sr_path)
    assert sr.VerificationFlag == "UNVERIFIED"
    text = str(sr)
    assert "Device" in text and "PI-RADS" in text and "PSA density" in text
    volumes = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in _walk(sr.ContentSequence)
        if item.get("ValueType") == "NUM"
        and item.ConceptNameCodeSequence[0].CodeValue == "118565006"
    ]
    assert volumes[0] == pytest.approx(result["metrics"]["prostate_volume_ml"], abs=0.01)
    # The worker's reading of patient data is in the audit trail, with the patient.
    trail = [
        orjson.loads(line)
        for line in (archive.storage.root / "audit.log").read_bytes().splitlines()
    ]
    reads = [e for e in trail if e["action"] == "ai.read_series" and e["series"] == series_uid]
    assert reads and reads[0]["patient_id"] == "PHANTOM" and reads[0]["actor"].startswith("ai-")
    assert any(e["action"] == "ai.store_results" and e["seg"] == seg.SOPInstanceUID for e in trail)
    # The segmentations API lists one row per segment, pointing into the one SEG.
    with session():
        rows = list(Segmentation.select().where(Segmentation.analysis_id == job.id))
    assert sorted(r.segment_number for r in rows) == [1, 2, 3, 4, 5]
    assert {r.seg_sop_instance_uid for r in rows} == {seg.SOPInstanceUID}


def _walk(items: Any) -> Iterator[Any]:
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_derived_objects_are_found_from_the_source_series(
    archive: Archive, phantom: Phantom, tmp_path: Path
) -> None:
    series_uid = _store(archive, phantom, tmp_path / "in")
    assert _run_job(archive, phantom, series_uid).status == jobs.COMPLETED
    request = parse_qido(
        Level.SERIES,
        [("ReferencedSeriesSequence.SeriesInstanceUID", series_uid)],
        default_return=[0x00080060],
    )
    with session():
        found = search(request.query).matches
    assert sorted(str(m.values[0x00080060]) for m in found) == ["SEG", "SR"]


def test_a_job_run_twice_stores_its_outputs_once(
    archive: Archive, phantom: Phantom, tmp_path: Path
) -> None:
    series_uid = _store(archive, phantom, tmp_path / "in")
    job = _run_job(archive, phantom, series_uid)
    with session():
        jobs.AnalysisJob.update(status=jobs.QUEUED).where(jobs.AnalysisJob.id == job.id).execute()
        jobs.AnalysisJob.update(max_attempts=5).execute()
    Worker(archive, oracle(phantom)).run_once()
    assert jobs.get(job.id).status == jobs.COMPLETED
    with session():
        assert Instance.select().where(Instance.sop_class_uid == SEG_CLASS).count() == 1
        assert Instance.select().where(Instance.sop_class_uid == SR_CLASS).count() == 1
        assert Segmentation.select().count() == 5


@pytest.mark.parametrize("damage", ["missing slice", "mixed orientation"])
def test_a_broken_series_fails_with_its_reason_and_writes_nothing(
    archive: Archive, phantom: Phantom, tmp_path: Path, damage: str
) -> None:
    files = write_series(phantom, tmp_path / "in")
    files.sort(key=lambda p: float(dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))
    if damage == "missing slice":
        files.pop(len(files) // 2)
    else:
        ds = dcmread(files[3])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]  # a coronal slice in an axial series
        ds.save_as(files[3])
    for path in files:
        archive.ingestor.ingest(path.read_bytes(), source="test")
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with pytest.raises(BrokenSeries):
        with session():
            study = Series.get(Series.series_instance_uid == series_uid).study.study_instance_uid
        load_series(archive.storage, study, series_uid)
    job = _run_job(archive, phantom, series_uid)
    assert job.status == jobs.FAILED
    expected = "missing" if damage == "missing slice" else "orientations"
    assert expected in job.error and job.attempts == 1
    with session():
        assert (
            Instance.select().where(Instance.sop_class_uid.in_([SEG_CLASS, SR_CLASS])).count() == 0
        )


def test_volume_slices_are_sorted_by_position(archive: Archive, tmp_path: Path) -> None:
    small = make_phantom(5, shape=(10, 48, 48), spacing=(3.0, 2.0, 2.0))
    series_uid = _store(archive, small, tmp_path / "in")
    with session():
        study = Series.get(Series.series_instance_uid == series_uid).study.study_instance_uid
    volume = load_series(archive.storage, study, series_uid)
    z = [float(d.ImagePositionPatient[2]) for d in volume.datasets]
    assert z == sorted(z) and volume.spacing == pytest.approx((3.0, 2.0, 2.0))


def test_out_of_gpu_memory_retries_at_reduced_resolution(
    archive: Archive, phantom: Phantom, tmp_path: Path
) -> None:
    scales: list[float] = []
    truth = oracle(phantom)

    def run(volume: np.ndarray[Any, Any], spacing: Any, scale: float, progress: Any) -> Any:
        scales.append(scale)
        if scale == 1.0:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return truth(volume, spacing)

    series_uid = _store(archive, phantom, tmp_path / "in")
    with session():
        study = Series.get(Series.series_instance_uid == series_uid).study.study_instance_uid
    job_id = jobs.enqueue(series_uid, study, None, version="t", trigger="api", max_attempts=1)
    Worker(archive, Segmenter("oom", "1", "cuda", run)).run_once()
    assert scales == [1.0, 0.5]
    assert jobs.get(job_id).status == jobs.COMPLETED


def test_the_results_themselves_trigger_nothing(
    archive: Archive, phantom: Phantom, tmp_path: Path
) -> None:
    """The SEG and SR are new series in the catalog; being derived objects, they get no job."""
    import datetime as dt

    from server.ai import trigger

    series_uid = _store(archive, phantom, tmp_path / "in")
    assert _run_job(archive, phantom, series_uid).status == jobs.COMPLETED
    later = dt.datetime.now(dt.UTC).replace(tzinfo=None) + dt.timedelta(minutes=5)
    queued = trigger.scan(archive.settings, now=later)
    assert [jobs.get(j).series_uid for j in queued] == [series_uid]  # the MR series only


def test_slices_are_ordered_by_position_not_instance_number(
    archive: Archive, phantom: Phantom, tmp_path: Path
) -> None:
    """Instance numbers that run against the positions (and so does the catalog's order): the
    volume and the SEG frames still follow the positions."""
    files = write_series(phantom, tmp_path / "in")
    for path in files:
        ds = dcmread(path)
        ds.InstanceNumber = 1000 - int(ds.InstanceNumber)
        ds.save_as(path)
    for path in files:
        archive.ingestor.ingest(path.read_bytes(), source="test")
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    with session():
        study = Series.get(Series.series_instance_uid == series_uid).study.study_instance_uid
    volume = load_series(archive.storage, study, series_uid)
    z = [float(d.ImagePositionPatient[2]) for d in volume.datasets]
    assert z == sorted(z)
    # The pixels stack in the phantom's own slice order (a reversed stack would not correlate).
    assert np.corrcoef(volume.pixels.ravel(), phantom.t2.ravel())[0, 1] > 0.99
    assert _run_job(archive, phantom, series_uid).status == jobs.COMPLETED


def _box_probabilities(lesion_slices: slice, lesion_columns: slice) -> np.ndarray[Any, Any]:
    """A box gland (transition zone) over slices 0-29 with a lesion block inside."""
    labels = np.zeros((30, 60, 60), np.uint8)
    labels[:, 10:50, 10:50] = 2
    labels[lesion_slices, 25:35, lesion_columns] = 3
    probabilities = np.zeros((4, *labels.shape), np.float32)
    for label in range(4):
        probabilities[label][labels == label] = 1.0
    return probabilities


@pytest.mark.parametrize(
    ("orientation", "side", "level"),
    [
        ([1, 0, 0, 0, 1, 0], "left", "base"),  # columns to the left, slices upwards
        ([-1, 0, 0, 0, 1, 0], "right", "apex"),  # columns to the right, normal downwards
        ([1, 0, 0, 0, -1, 0], "left", "apex"),  # row direction flipped: normal downwards
    ],
)
def test_lesion_side_and_level_follow_the_patient_axes(
    orientation: list[int], side: str, level: str
) -> None:
    # The lesion sits at high column indices and in the last slices.
    probabilities = _box_probabilities(slice(24, 28), slice(38, 46))
    found = findings(probabilities, (3.0, 1.0, 1.0), [float(v) for v in orientation])
    assert len(found.lesions) == 1
    assert found.lesions[0].location == f"transition_zone_{side}_{level}"
    assert found.lesions[0].diameter_mm == pytest.approx(11.0, abs=1.5)  # 8 x 10 px at 1 mm
