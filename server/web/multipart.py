"""multipart/related bodies (RFC 2387) as PS3.18 uses them: writing WADO-RS responses part by
part, and reading STOW-RS requests part by part as they stream in."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from server.web.http import HTTPError


def new_boundary() -> str:
    return secrets.token_hex(16)


@dataclass
class MultipartWriter:
    boundary: str = field(default_factory=new_boundary)
    _first: bool = True

    def content_type(self, part_type: str, **params: str) -> str:
        extra = "".join(f"; {k}={v}" for k, v in params.items())
        return f'multipart/related; type="{part_type}"{extra}; boundary={self.boundary}'

    def part_header(self, content_type: str, location: str | None = None) -> bytes:
        lead = b"" if self._first else b"\r\n"
        self._first = False
        head = f"--{self.boundary}\r\nContent-Type: {content_type}\r\n"
        if location:
            head += f"Content-Location: {location}\r\n"
        return lead + head.encode() + b"\r\n"

    def close(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode()


@dataclass
class Part:
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n"):
        if not line.strip():
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            raise HTTPError(400, f"malformed part header line {line[:80]!r}")
        headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
    return headers


async def read_parts(
    chunks: AsyncIterator[bytes], boundary: str, max_part: int
) -> AsyncIterator[Part]:
    """Yield each part as soon as its closing delimiter has arrived; only one part is held in
    memory at a time.  A body that does not follow RFC 2046 5.1.1 raises a 400."""
    delimiter = b"--" + boundary.encode("latin-1")
    buf = bytearray()
    started = False
    finished = False
    scan = 0  # where to resume looking for the delimiter: parts arrive in many chunks
    async for chunk in chunks:
        buf += chunk
        while True:
            if not started:
                at = buf.find(delimiter)
                if at < 0:
                    if len(buf) > 64 * 1024:
                        raise HTTPError(400, "multipart body does not start with its boundary")
                    break
                del buf[: at + len(delimiter)]
                started = True
            if len(buf) < 2:
                break
            if buf[:2] == b"--":
                finished = True
                break
            end = buf.find(b"\r\n" + delimiter, scan)
            if end >= 0:
                after = end + 2 + len(delimiter)
                if len(buf) < after + 2:
                    break  # wait for the bytes that say whether this is really a delimiter
                follow = bytes(buf[after : after + 2])
                if follow not in (b"--", b"\r\n") and follow[:1] not in (b" ", b"\t"):
                    scan = end + 1  # the boundary text followed by more text: part content
                    continue
            if end < 0:
                if len(buf) > max_part:
                    raise HTTPError(413, f"a part is larger than {max_part} bytes")
                scan = max(0, len(buf) - len(delimiter) - 2)
                break
            scan = 0
            split = buf.find(b"\r\n\r\n", 0, end)
            if split < 0:
                raise HTTPError(400, "multipart part lacks the blank line after its headers")
            head = bytes(buf[:split])
            body = bytes(buf[split + 4 : end])  # the one copy of the part's content
            del buf[: end + 2 + len(delimiter)]
            yield Part(_parse_headers(head.lstrip(b" \t").removeprefix(b"\r\n")), body)
        if finished:
            break
    if not started:
        raise HTTPError(400, "multipart body contains no part")
    if not finished:
        raise HTTPError(400, "multipart body ends without its closing boundary")
