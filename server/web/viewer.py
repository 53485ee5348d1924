"""The bundled OHIF viewer at ``/viewer`` (installed into ``viewer/`` by ``tools/install_viewer``).

OHIF's prebuilt bundle (``package/dist`` of the npm package ``@ohif/app``) is built to live at
the root of its origin: index.html names its scripts ``/app.bundle.*.js``, webpack's public path
is the literal ``"/"`` (in the app bundle and in each web worker's bundle), and the stylesheet
loads its font from ``url(/...)``. Rather than rebuilding it with ``PUBLIC_URL=/viewer/``, the
few files that say so are rewritten as they are served (once per process; they stay in memory):

* ``index.html`` gets ``<base href="/viewer/">``, ``window.PUBLIC_URL = "/viewer/"`` and
  ``/viewer/`` in front of every root-relative ``href``/``src``/``content``;
* every ``*.js`` file that sets ``__webpack_require__.p = "/"`` gets ``"/viewer/"`` (chunks, web
  workers and their ``.wasm`` codecs are then fetched from under ``/viewer/``); the microscopy
  viewer's absolute import gets the prefix too;
* ``*.css`` files get it in ``url(/...)``, ``manifest.json`` in its icon paths.

Any path that is neither a file of the bundle nor something with a file extension is one of
OHIF's client-side routes (``/viewer/viewer?StudyInstanceUIDs=...``) and gets index.html.
``/viewer/app-config.js`` is generated per request: OHIF's one data source is this server's
``/dicom-web`` on the origin the browser used, so the viewer works on whatever host name or port
the server is reached by, with no CORS. Every response carries the cross-origin isolation
headers (COOP/COEP), which give cornerstone ``SharedArrayBuffer``.

Text assets are sent gzip-compressed to clients that accept it (compressed once, kept in memory);
other files are streamed from disk. Hashed file names (``*.bundle.<hash>.js``, ``<hash>.wasm``)
are cacheable for a year; the rest is revalidated with its ETag.
"""

from __future__ import annotations

import gzip
import json
import mimetypes
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route

__all__ = ["MOUNT", "app_config", "viewer_routes"]

MOUNT = "/viewer"
_BASE = MOUNT + "/"
_DICOMWEB = "/dicom-web"

_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".jsonc": "application/json",
    ".map": "application/json",
    ".webapp": "application/x-web-app-manifest+json",
    ".wasm": "application/wasm",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".xml": "application/xml",
    ".txt": "text/plain; charset=utf-8",
}
# compressible: worth gzip (wasm shrinks to about a third as well)
_TEXT = {".html", ".js", ".mjs", ".css", ".json", ".jsonc", ".map", ".webapp", ".svg", ".xml"}
_COMPRESSIBLE = _TEXT | {".wasm", ".txt"}
_GZIP_MIN = 1400
_HASHED = re.compile(r"(^|[./])[0-9a-f]{16}\.[a-z0-9]+$")
_SECURITY_HEADERS = {
    # cross-origin isolation (SharedArrayBuffer for cornerstone's volume loading); everything the
    # viewer loads is on this origin, so require-corp costs nothing
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
_IMMUTABLE = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"

# --- rewriting the bundle for /viewer/ ----------------------------------------------------------

_ROOT_ATTR = re.compile(rb'(\s(?:href|src|content)=)(["\']?)/(?!/)')
_CSS_URL = re.compile(rb"""url\((["']?)/(?!/)""")
_JS_PUBLIC_PATH = b'__webpack_require__.p = "/";'
_JS_MICROSCOPY = b"browserImportFunction('/dicom-microscopy-viewer/"


def _rewrite_index(body: bytes) -> bytes:
    base = _BASE.encode()
    body = body.replace(b'window.PUBLIC_URL="/"', b'window.PUBLIC_URL="' + base + b'"')
    body = _ROOT_ATTR.sub(lambda m: m.group(1) + m.group(2) + base, body)
    return re.sub(rb"<head>", b'<head><base href="' + base + b'">', body, count=1)


def _rewrite_js(body: bytes) -> bytes:
    base = _BASE.encode()
    body = body.replace(_JS_PUBLIC_PATH, b'__webpack_require__.p = "' + base + b'";')
    return body.replace(
        _JS_MICROSCOPY, b"browserImportFunction('" + base + b"dicom-microscopy-viewer/"
    )


def _rewrite_css(body: bytes) -> bytes:
    return _CSS_URL.sub(lambda m: b"url(" + m.group(1) + _BASE.encode(), body)


def _rewrite_manifest(body: bytes) -> bytes:
    return body.replace(b'"/assets/', b'"' + _BASE.encode() + b"assets/")


def _rewriter(relative: str) -> Callable[[bytes], bytes] | None:
    if relative == "index.html":
        return _rewrite_index
    if relative == "manifest.json":
        return _rewrite_manifest
    suffix = os.path.splitext(relative)[1]
    if suffix in (".js", ".mjs"):
        return _rewrite_js
    if suffix == ".css":
        return _rewrite_css
    return None


# --- app-config.js --------------------------------------------------------------------------------

_CONFIG_TEMPLATE = """\
/* OHIF runtime configuration, generated by the imaging server for each request: the viewer's
   one data source is this server's DICOMweb service on the origin the page was loaded from. */
window.config = {
  name: 'imaging-server',
  routerBasename: @BASENAME@,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  maxNumRequests: { interaction: 100, thumbnail: 5, prefetch: 10 },
  showErrorDetails: 'always',
  defaultDataSourceName: 'dicomweb',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomweb',
      configuration: {
        friendlyName: 'Imaging server',
        name: 'imaging-server',
        wadoUriRoot: @DICOMWEB_ROOT@,
        qidoRoot: @DICOMWEB_ROOT@,
        wadoRoot: @DICOMWEB_ROOT@,
        qidoSupportsIncludeField: true,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
  httpErrorHandler: error => {
    console.warn('DICOMweb request failed', error && error.status);
  },
};
"""


def app_config(origin: str) -> str:
    """OHIF's ``app-config.js`` for a page loaded from ``origin`` (``scheme://host[:port]``)."""
    root = origin.rstrip("/") + _DICOMWEB
    # json.dumps gives a valid JavaScript string literal whatever the Host header held
    return _CONFIG_TEMPLATE.replace("@BASENAME@", json.dumps(MOUNT)).replace(
        "@DICOMWEB_ROOT@", json.dumps(root)
    )


# --- serving --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Cached:
    key: tuple[int, int, int]  # inode, mtime, size of the file it was made from
    etag: str
    body: bytes | None  # the rewritten body; None when the file is served as it is on disk
    gzipped: bytes | None  # gzip of the body (or of the file), made on first demand


def _stat_key(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _etag(key: tuple[int, int, int], rewritten: bool) -> str:
    ino, mtime, size = key
    return f'"{ino:x}-{mtime:x}-{size:x}{"-v" if rewritten else ""}"'


class _Viewer:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.cache: dict[str, _Cached] = {}

    def resolve(self, relative: str) -> tuple[str, Path, os.stat_result] | None:
        """The bundle file for a path under /viewer/, or None. Never leaves the bundle folder."""
        relative = relative.strip("/") or "index.html"
        if "\\" in relative or "\0" in relative:
            return None
        path = (self.root / relative).resolve()
        if path != self.root and self.root not in path.parents:
            return None
        try:
            st = path.stat()
            if os.path.isdir(path):
                path = path / "index.html"
                relative = f"{relative}/index.html"
                st = path.stat()
        except OSError:
            return None
        if not os.path.isfile(path):
            return None
        return path.relative_to(self.root).as_posix(), path, st

    def entry(self, relative: str, path: Path, st: os.stat_result, want_gzip: bool) -> _Cached:
        """The in-memory state of a rewritable or compressed file, made on first demand."""
        key = _stat_key(st)
        cached = self.cache.get(relative)
        if cached is None or cached.key != key:
            body: bytes | None = None
            rewrite = _rewriter(relative)
            if rewrite is not None:
                original = path.read_bytes()
                changed = rewrite(original)
                body = changed if changed != original else None
            cached = _Cached(key, _etag(key, body is not None), body, None)
            self.cache[relative] = cached
        if want_gzip and cached.gzipped is None:
            data = cached.body if cached.body is not None else path.read_bytes()
            cached = replace(cached, gzipped=_gzip(data))
            self.cache[relative] = cached
        return cached

    def serve(self, request: Request, relative: str, path: Path, st: os.stat_result) -> Response:
        suffix = os.path.splitext(relative)[1].lower()
        media_type = _MEDIA_TYPES.get(suffix) or (
            mimetypes.guess_type(relative)[0] or "application/octet-stream"
        )
        headers = dict(_SECURITY_HEADERS)
        headers["Cache-Control"] = _IMMUTABLE if _HASHED.search(relative) else _REVALIDATE
        compressible = suffix in _COMPRESSIBLE and st.st_size >= _GZIP_MIN
        want_gzip = compressible and _accepts_gzip(request)
        if compressible:
            headers["Vary"] = "Accept-Encoding"
        rewritable = _rewriter(relative) is not None
        if not (want_gzip or rewritable):
            etag = _etag(_stat_key(st), False)
            if _not_modified(request, etag):
                return Response(status_code=304, headers={**headers, "ETag": etag})
            response = FileResponse(path, media_type=media_type, headers=headers, stat_result=st)
            response.headers["ETag"] = etag
            return response
        cached = self.entry(relative, path, st, want_gzip)
        etag = cached.etag[:-1] + '-gz"' if want_gzip else cached.etag
        headers["ETag"] = etag
        if _not_modified(request, etag):
            return Response(status_code=304, headers=headers)
        if want_gzip:
            assert cached.gzipped is not None
            headers["Content-Encoding"] = "gzip"
            return Response(cached.gzipped, media_type=media_type, headers=headers)
        if cached.body is None:
            response = FileResponse(path, media_type=media_type, headers=headers, stat_result=st)
            response.headers["ETag"] = etag
            return response
        return Response(cached.body, media_type=media_type, headers=headers)

    def endpoint(self, request: Request) -> Response:
        relative = str(request.path_params.get("path", ""))
        if relative == "app-config.js":
            headers = {**_SECURITY_HEADERS, "Cache-Control": "no-store"}
            origin = f"{request.url.scheme}://{request.url.netloc}"
            return Response(app_config(origin), media_type=_MEDIA_TYPES[".js"], headers=headers)
        found = self.resolve(relative)
        if found is None:
            last = relative.rstrip("/").rsplit("/", 1)[-1]
            if "." in last and "text/html" not in request.headers.get("accept", ""):
                return PlainTextResponse("not found", 404, headers=_SECURITY_HEADERS)
            # one of OHIF's client-side routes: the app sorts it out
            found = self.resolve("index.html")
            if found is None:
                return PlainTextResponse("viewer not installed", 404, headers=_SECURITY_HEADERS)
        return self.serve(request, *found)


def _accepts_gzip(request: Request) -> bool:
    for item in request.headers.get("accept-encoding", "").split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            q = params.strip().removeprefix("q=").strip()
            return not q or _q_positive(q)
    return False


def _q_positive(q: str) -> bool:
    try:
        return float(q) > 0
    except ValueError:
        return True


def _not_modified(request: Request, etag: str) -> bool:
    header = request.headers.get("if-none-match")
    if not header:
        return False
    tags = {t.strip().removeprefix("W/") for t in header.split(",")}
    return etag in tags or "*" in tags


def _gzip(data: bytes) -> bytes:
    return gzip.compress(data, compresslevel=6, mtime=0)


def viewer_routes(viewer_dir: Path) -> list[BaseRoute]:
    """Routes serving the OHIF bundle in ``viewer_dir`` at ``/viewer`` (see the module doc)."""
    viewer = _Viewer(viewer_dir)

    def redirect(request: Request) -> Response:
        query = request.url.query
        return RedirectResponse(_BASE + (f"?{query}" if query else ""), status_code=308)

    return [
        Route(MOUNT, redirect, methods=["GET", "HEAD"]),
        Route(MOUNT + "/{path:path}", viewer.endpoint, methods=["GET", "HEAD"]),
    ]
