"""The /viewer routes on a miniature OHIF bundle (no browser; tests/e2e/test_ohif.py runs the
real one in Chromium)."""

from __future__ import annotations

import asyncio
import gzip
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from server.web.viewer import _Viewer, app_config, viewer_routes

INDEX = (
    '<!doctype html><html lang="en"><head><meta charset="UTF-8">'
    '<meta name="msapplication-TileImage" content="/assets/tile.png">'
    '<script>window.PUBLIC_URL="/"</script><link rel="manifest" href="/manifest.json">'
    '<script src="/app-config.js"></script>'
    '<script defer src="/app.bundle.0123456789abcdef.js"></script>'
    '<link href="/app.bundle.css" rel="stylesheet"><a href="//elsewhere.example/x">x</a>'
    '</head><body><div id="root"></div></body></html>'
)
BUNDLE = (
    "// webpack/runtime/public_path\n(() => {\n"
    '__webpack_require__.p = "/";\n})();\n'
    "const m = await window.browserImportFunction('/dicom-microscopy-viewer/viewer.min.js');\n"
    + "// padding\n"
    * 300
)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    root = tmp_path / "viewer"
    (root / "assets").mkdir(parents=True)
    (root / "index.html").write_text(INDEX)
    (root / "app.bundle.0123456789abcdef.js").write_text(BUNDLE)
    (root / "plain.bundle.fedcba9876543210.js").write_text("console.log(1);\n" * 200)
    (root / "app.bundle.css").write_text("@font-face{src:url(/a34f9d1faa5f3315.woff2)}")
    (root / "app-config.js").write_text("window.config = {name: 'the original'};")
    (root / "manifest.json").write_text('{"icons": [{"src": "/assets/icon.png"}]}')
    (root / "0123456789abcdef.wasm").write_bytes(b"\0asm\1\0\0\0" + bytes(4000))
    (root / "assets" / "favicon.ico").write_bytes(b"\0\0\1\0")
    (tmp_path / "secret.txt").write_text("not for the web")
    return root


def _get(root: Path, path: str, **headers: str) -> httpx.Response:
    app = Starlette(routes=viewer_routes(root))

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(go())


def test_redirects_to_the_slash(bundle: Path) -> None:
    response = _get(bundle, "/viewer?x=1")
    assert response.status_code == 308
    assert response.headers["location"] == "/viewer/?x=1"


def test_index_is_rewritten_for_the_mount(bundle: Path) -> None:
    response = _get(bundle, "/viewer/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    body = response.text
    assert '<head><base href="/viewer/">' in body
    assert 'window.PUBLIC_URL="/viewer/"' in body
    assert 'src="/viewer/app.bundle.0123456789abcdef.js"' in body
    assert 'src="/viewer/app-config.js"' in body
    assert 'href="/viewer/app.bundle.css"' in body
    assert 'content="/viewer/assets/tile.png"' in body
    assert 'href="//elsewhere.example/x"' in body  # protocol-relative: untouched
    assert response.headers["cross-origin-embedder-policy"] == "require-corp"
    assert response.headers["cross-origin-opener-policy"] == "same-origin"
    assert response.headers["cache-control"] == "no-cache"


@pytest.mark.parametrize(
    "path", ["/viewer/viewer?StudyInstanceUIDs=1.2.3", "/viewer/viewer/", "/viewer/local"]
)
def test_client_side_routes_get_index(bundle: Path, path: str) -> None:
    response = _get(bundle, path)
    assert response.status_code == 200
    assert '<base href="/viewer/">' in response.text


def test_missing_asset_is_404(bundle: Path) -> None:
    assert _get(bundle, "/viewer/nothere.bundle.js").status_code == 404
    # ... unless a browser navigates there
    assert _get(bundle, "/viewer/x.y", accept="text/html").status_code == 200


def test_app_config_points_at_the_requests_origin(bundle: Path) -> None:
    response = _get(bundle, "/viewer/app-config.js", host="archive.example:8042")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.headers["cache-control"] == "no-store"
    body = response.text
    assert "the original" not in body
    assert 'routerBasename: "/viewer"' in body
    for key in ("wadoUriRoot", "qidoRoot", "wadoRoot"):
        assert f'{key}: "http://archive.example:8042/dicom-web"' in body
    for setting in (
        "imageRendering: 'wadors'",
        "thumbnailRendering: 'wadors'",
        "enableStudyLazyLoad: true",
        "qidoSupportsIncludeField: true",
        "supportsWildcard: true",
        "omitQuotationForMultipartRequest: true",
    ):
        assert setting in body


def test_app_config_quotes_the_origin() -> None:
    body = app_config('http://evil"host')
    assert 'qidoRoot: "http://evil\\"host/dicom-web"' in body


def test_bundle_public_path_and_gzip(bundle: Path) -> None:
    path = "/viewer/app.bundle.0123456789abcdef.js"
    plain = _get(bundle, path, **{"accept-encoding": "identity"})
    assert plain.status_code == 200
    assert "content-encoding" not in plain.headers
    assert '__webpack_require__.p = "/viewer/";' in plain.text
    assert "browserImportFunction('/viewer/dicom-microscopy-viewer/" in plain.text
    assert plain.headers["cache-control"].endswith("immutable")
    zipped = _get(bundle, path, **{"accept-encoding": "gzip, br"})
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.text == plain.text  # httpx decoded it
    assert zipped.headers["etag"] != plain.headers["etag"]
    assert zipped.headers["vary"] == "Accept-Encoding"
    again = _get(
        bundle, path, **{"accept-encoding": "gzip", "if-none-match": zipped.headers["etag"]}
    )
    assert again.status_code == 304


def test_unchanged_js_is_served_as_is(bundle: Path) -> None:
    path = "/viewer/plain.bundle.fedcba9876543210.js"
    response = _get(bundle, path, **{"accept-encoding": "identity"})
    assert response.text == (bundle / "plain.bundle.fedcba9876543210.js").read_text()
    etag = response.headers["etag"]
    assert _get(bundle, path, **{"if-none-match": etag, "accept-encoding": ""}).status_code == 304


def test_css_and_manifest_paths(bundle: Path) -> None:
    assert "url(/viewer/a34f9d1faa5f3315.woff2)" in _get(bundle, "/viewer/app.bundle.css").text
    assert '"/viewer/assets/icon.png"' in _get(bundle, "/viewer/manifest.json").text


def test_media_types(bundle: Path) -> None:
    wasm = _get(bundle, "/viewer/0123456789abcdef.wasm", **{"accept-encoding": "gzip"})
    assert wasm.headers["content-type"] == "application/wasm"
    assert wasm.content.startswith(b"\0asm")
    raw = _get(bundle, "/viewer/0123456789abcdef.wasm", **{"accept-encoding": "identity"})
    assert raw.headers["content-type"] == "application/wasm"
    assert raw.content == (bundle / "0123456789abcdef.wasm").read_bytes()
    assert _get(bundle, "/viewer/assets/favicon.ico").headers["content-type"] == "image/x-icon"
    css = _get(bundle, "/viewer/app.bundle.css")
    assert css.headers["content-type"].startswith("text/css")


def test_never_leaves_the_bundle(bundle: Path) -> None:
    viewer = _Viewer(bundle)
    for path in ("../secret.txt", "assets/../../secret.txt", "/../secret.txt", "a\\..\\b"):
        assert viewer.resolve(path) is None, path
    assert viewer.resolve("assets/favicon.ico") is not None
    response = _get(bundle, "/viewer/..%2fsecret.txt")
    assert "not for the web" not in response.text


def test_gzip_roundtrip_is_deterministic(bundle: Path) -> None:
    # the same bytes for the same file, so caches and ETags agree across processes
    viewer = _Viewer(bundle)
    found = viewer.resolve("app.bundle.0123456789abcdef.js")
    assert found is not None
    first = viewer.entry(*found, want_gzip=True)
    again = _Viewer(bundle).entry(*found, want_gzip=True)
    assert first.gzipped == again.gzipped
    assert first.gzipped is not None
    assert gzip.decompress(first.gzipped).startswith(b"// webpack")
