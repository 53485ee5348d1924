"""The HTTP building blocks: Accept negotiation, the multipart reader, QIDO parameter parsing,
and the app's CORS and gzip behaviour (in process, Starlette's TestClient)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless
from starlette.requests import Request
from starlette.testclient import TestClient

from server.dicom.attributes import BY_KEYWORD, Level
from server.dicom.query import MatchKind, parse_qido
from server.errors import QueryError
from server.web.dicomweb.wado import choose_instance_syntax
from server.web.http import HTTPError, parse_accept, parse_media_type
from server.web.multipart import Part, read_parts


def _request(accept: str, query: bytes = b"") -> Request:
    return Request(
        {
            "type": "http",
            "method": "GET",
            "path": "/",
            "headers": [(b"accept", accept.encode())],
            "query_string": query,
        }
    )


def test_accept_parsing_follows_quotes_and_q() -> None:
    ranges = parse_accept(
        _request(
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.80;'
            ' q=0.5, multipart/related; type="application/dicom", text/html; q=0'
        )
    )
    assert [r.params.get("transfer-syntax") for r in ranges] == [None, JPEGLSLossless]
    quoted = parse_media_type('multipart/related; type="a;b"; boundary=x')
    assert quoted.params == {"type": "a;b", "boundary": "x"}
    # The accept query parameter wins over the header (PS3.18 8.3.3.1).
    assert parse_accept(_request("text/html", b"accept=image%2Fpng"))[0].type == "image/png"


def test_instance_syntax_negotiation() -> None:
    def choose(accept: str, stored: str) -> str | None:
        return choose_instance_syntax(parse_accept(_request(accept)), stored)

    dicom = 'multipart/related; type="application/dicom"'
    assert choose(f"{dicom}; transfer-syntax=*", JPEGLSLossless) == JPEGLSLossless
    assert choose(dicom, JPEGLSLossless) == ExplicitVRLittleEndian  # PS3.18 default
    assert choose(f"{dicom}; transfer-syntax={JPEGLSLossless}", ExplicitVRLittleEndian) == (
        JPEGLSLossless
    )
    assert (
        choose(f"{dicom}; transfer-syntax=1.2.840.10008.1.2.4.50", ExplicitVRLittleEndian) is None
    )
    assert choose("application/pdf", ExplicitVRLittleEndian) is None


async def _collect(chunks: list[bytes], boundary: str) -> list[Part]:
    async def source() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return [p async for p in read_parts(source(), boundary, 1 << 20)]


def _split(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("chunk", [1, 3, 7, 64, 100000])
def test_multipart_reader_in_any_chunking(chunk: int) -> None:
    body = (
        b"preamble\r\n--XyZ\r\nContent-Type: application/dicom\r\n\r\nfirst\r\n--XyZ-not\r\n"
        b"--XyZ\r\ncontent-type: application/octet-stream\r\n\r\nsecond\r\n--XyZ--\r\nepilogue"
    )
    parts = asyncio.run(_collect(_split(body, chunk), "XyZ"))
    assert [(p.content_type, p.body) for p in parts] == [
        ("application/dicom", b"first\r\n--XyZ-not"),
        ("application/octet-stream", b"second"),
    ]


def test_multipart_reader_refuses_malformed_bodies() -> None:
    with pytest.raises(HTTPError) as unterminated:
        asyncio.run(_collect([b"--b\r\nContent-Type: x\r\n\r\nabc"], "b"))
    assert unterminated.value.status == 400
    with pytest.raises(HTTPError):
        asyncio.run(_collect([b"no boundary here"], "b"))
    with pytest.raises(HTTPError) as too_big:
        asyncio.run(_collect([b"--b\r\n\r\n" + b"x" * (2 << 20)], "b"))
    assert too_big.value.status == 413


def test_qido_parameters() -> None:
    qido = parse_qido(
        Level.STUDY,
        [
            ("PatientName", "LEW*"),
            ("00100020", "P1"),
            ("StudyInstanceUID", "1.2.3,1.2.4"),
            ("StudyDate", "20200101-"),
            ("includefield", "00081030,ModalitiesInStudy"),
            ("includefield", "00080090"),
            ("limit", "10"),
            ("offset", "5"),
            ("fuzzymatching", "true"),
        ],
    )
    by_tag = {c.tag: c for c in qido.query.constraints}
    assert by_tag[BY_KEYWORD["PatientName"].tag].terms[0].kind is MatchKind.WILDCARD
    assert by_tag[BY_KEYWORD["PatientID"].tag].terms[0].value == "P1"
    assert [t.value for t in by_tag[BY_KEYWORD["StudyInstanceUID"].tag].terms] == [
        "1.2.3",
        "1.2.4",
    ]
    assert by_tag[BY_KEYWORD["StudyDate"].tag].terms[0].kind is MatchKind.RANGE
    for keyword in ("StudyDescription", "ModalitiesInStudy", "ReferringPhysicianName"):
        assert by_tag[BY_KEYWORD[keyword].tag].universal
    assert (qido.query.limit, qido.query.offset, qido.fuzzy_requested) == (10, 5, True)
    for bad in ([("Nope", "1")], [("limit", "x")], [("offset", "-2")]):
        with pytest.raises(QueryError):
            parse_qido(Level.STUDY, bad)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    from server.archive import close_archive, open_archive
    from server.config import load_settings
    from server.web.app import build_app

    settings = load_settings(
        None,
        {
            "data_dir": str(tmp_path / "data"),
            "cors_origins": "https://viewer.example.org",
            "viewer_dir": str(tmp_path / "no-viewer"),
        },
    )
    archive = open_archive(settings)
    try:
        # From this machine: DICOMweb's loopback exemption applies (auth has its own tests).
        with TestClient(build_app(archive), client=("127.0.0.1", 40000)) as test_client:
            yield test_client
    finally:
        close_archive()


def test_cors_allows_only_the_configured_origins(client: TestClient) -> None:
    preflight = {
        "Origin": "https://viewer.example.org",
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "accept",
    }
    allowed = client.options("/dicom-web/studies", headers=preflight)
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://viewer.example.org"
    other = client.options(
        "/dicom-web/studies", headers={**preflight, "Origin": "https://evil.example.com"}
    )
    assert other.status_code == 400
    simple = client.get("/dicom-web/studies", headers={"Origin": "https://viewer.example.org"})
    assert simple.headers["access-control-allow-origin"] == "https://viewer.example.org"
    assert "warning" in simple.headers["access-control-expose-headers"].lower()


def test_errors_are_json_and_unknown_paths_404(client: TestClient) -> None:
    missing = client.get("/dicom-web/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "NOT_FOUND"
    bad = client.get("/dicom-web/studies?limit=abc")
    assert bad.status_code == 400
    assert "limit" in bad.json()["error"]["message"]
    assert client.get("/viewer/").status_code == 404  # no bundle installed here
    remote = TestClient(client.app, client=("198.51.100.7", 40000))
    denied = remote.get("/dicom-web/studies")
    assert denied.status_code == 401
    assert denied.json()["error"]["code"] == "AUTHENTICATION_REQUIRED"
