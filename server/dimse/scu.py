"""Outgoing DIMSE: C-ECHO and C-STORE to configured peers (the ``echo`` and ``send`` commands).

A peer with ``tls = true`` in peers.toml is reached over TLS (PS3.15 Annex B, server/tls.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from server import tls
from server.config import Peer, Settings


@dataclass
class SendReport:
    sent: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)


def _ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.maximum_pdu_size = settings.max_pdu
    return ae


def _associate(settings: Settings, ae: AE, peer: Peer) -> Association:
    """An established association with ``peer`` (over TLS when it has ``tls = true``); raises
    ConnectionError otherwise."""
    args = tls.client_args(settings, peer)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=args)
    if not assoc.is_established:
        over = " over TLS" if args else ""
        raise ConnectionError(
            f"association with {peer.ae_title} at {peer.host}:{peer.port}{over} failed"
        )
    return assoc


def echo(settings: Settings, peer: Peer) -> int:
    """C-ECHO the peer; returns the DIMSE status (or raises ConnectionError)."""
    ae = _ae(settings)
    ae.add_requested_context(Verification)
    assoc = _associate(settings, ae, peer)
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else -1
    finally:
        assoc.release()


def send_files(
    settings: Settings,
    peer: Peer,
    paths: Iterable[Path],
    progress: Callable[[int, int], None] | None = None,
) -> SendReport:
    """C-STORE each file (as stored) to ``peer`` over one association."""
    files = list(paths)
    headers = []
    for path in files:
        head = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        headers.append((path, str(head.SOPClassUID), str(head.file_meta.TransferSyntaxUID)))
    pairs: dict[tuple[str, str], None] = {(c, t): None for _, c, t in headers}
    ae = _ae(settings)
    for sop_class, syntax in list(pairs)[:128]:
        extra = [s for s in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) if s != syntax]
        ae.requested_contexts.append(build_context(sop_class, [syntax, *extra]))
    report = SendReport()
    if not files:
        return report
    assoc = _associate(settings, ae, peer)
    try:
        for n, (path, _, _) in enumerate(headers, start=1):
            status = assoc.send_c_store(dcmread(path))
            code = int(status.Status) if status else -1
            if code in (0x0000, 0xB000, 0xB007, 0xB006):
                report.sent += 1
            else:
                report.failed.append((str(path), f"0x{code:04X}" if code >= 0 else "no response"))
            if progress:
                progress(n, len(files))
    finally:
        assoc.release()
    return report
