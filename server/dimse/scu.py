"""Outgoing DIMSE: C-ECHO and C-STORE to configured peers (the ``echo`` and ``send`` commands)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification

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


def echo(settings: Settings, peer: Peer) -> int:
    """C-ECHO the peer; returns the DIMSE status (or raises ConnectionError)."""
    ae = _ae(settings)
    ae.add_requested_context(Verification)
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"association with {peer.ae_title} at {peer.host}:{peer.port} failed")
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
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise ConnectionError(f"association with {peer.ae_title} at {peer.host}:{peer.port} failed")
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
