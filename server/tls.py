"""TLS for DICOM associations (PS3.15 Annex B) and for the HTTP port: SSL contexts from the
settings, and the server side of the handshake.

* **Profile**: PS3.15 B.12 (BCP 195: RFC 8996, RFC 9325): TLS 1.2 or 1.3, never SSL, TLS 1.0 or
  1.1; OpenSSL negotiates 1.3 when both ends have it (as B.12 asks).  TLS 1.2 cipher suites
  are the AEAD ones with forward secrecy that RFC 9325 4.2 recommends (ECDHE/DHE with AES-GCM
  or ChaCha20-Poly1305), which include those of DCMTK's BCP 195 profiles; those only take RSA
  certificates, so use RSA keys for DCMTK peers.
* **Port**: PS3.15 B.1 wants the TLS port to be different from the plain one; ``[tls]
  dicom_port`` (2762 is registered as ``dicom-tls``) is opened next to ``[ae] port``, which
  ``plain_dicom = false`` closes for a TLS-only node.
* **Server side** (the DICOM TLS port and HTTPS): the ``[tls]`` certificate and key; with
  ``ca_certificates`` a client certificate is asked for and must chain to those CAs when sent,
  and with ``require_client_certificate`` a client without one is refused during the handshake,
  before any DICOM PDU is read.
* **Client side** (peers with ``tls = true``: ``send``, ``echo``, C-MOVE sub-operations): the
  peer's certificate must chain to its ``tls_ca_certificates``, else ``[tls] ca_certificates``,
  else the system's CAs, and name its ``host`` unless ``tls_check_hostname = false`` (RFC 9325
  6.3, RFC 6125); we present the peer's ``tls_certificate`` or else ``[tls] certificate``.

Files are checked when ``serve`` starts (:func:`check`): missing, unreadable, not PEM, a key
that does not match its certificate, or an encrypted key each stop start-up with the setting's
file and line.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import ssl
import threading
from pathlib import Path
from typing import Any

from server.config import Peer, Settings
from server.errors import ConfigError

log = logging.getLogger(__name__)

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2  # PS3.15 B.12: no TLS 1.0/1.1 (RFC 8996)
# TLS 1.2 suites (RFC 9325 4.2); TLS 1.3 has its own, all of them acceptable.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!aDSS"


class SerialisedSSLSocket(ssl.SSLSocket):
    """An SSLSocket whose TLS reads and writes never run at the same time.

    OpenSSL does not allow one connection to be used from two threads at once, and the fast
    paths write on an association's socket from the association thread (C-FIND responses,
    C-MOVE sub-operations) while pynetdicom's DUL thread may be reading from it.  A plain socket
    is full duplex; this one takes turns, one read or write at a time.  A read holds the turn
    only until its record is in, as pynetdicom reads only once ``select`` (or ``pending``) says
    the peer sent something."""

    def _io_lock(self) -> threading.RLock:
        lock: threading.RLock = self.__dict__.setdefault("_tls_io_lock", threading.RLock())
        return lock

    def read(self, len: int = 1024, buffer: Any = None) -> Any:
        with self._io_lock():
            return super().read(len, buffer)

    def write(self, data: Any) -> int:
        with self._io_lock():
            return super().write(data)

    def send(self, data: Any, flags: int = 0) -> int:
        with self._io_lock():
            return super().send(data, flags)

    def pending(self) -> int:
        with self._io_lock():
            return super().pending()


def _location(settings: Settings, name: str) -> str | None:
    return settings.location(name) or str(settings.config_dir / "server.toml")


def _readable(path: Path, what: str, where: str | None) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror or exc}", where) from None


def _warn_validity(pem: bytes, path: Path) -> None:
    """Log when the (first) certificate has expired or is not valid yet: OpenSSL loads it, and
    every peer then refuses the handshake with a less obvious message."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return  # OpenSSL's error is reported by the caller
    now = dt.datetime.now(dt.UTC)
    if cert.not_valid_after_utc < now:
        log.warning("TLS certificate %s expired on %s", path, cert.not_valid_after_utc.date())
    elif cert.not_valid_before_utc > now:
        log.warning("TLS certificate %s is not valid before %s", path, cert.not_valid_before_utc)


def _no_password() -> str:
    # Without this, OpenSSL would prompt for the password on the terminal.
    raise ValueError("encrypted private key")


def _load_chain(
    ctx: ssl.SSLContext,
    certificate: Path,
    key: Path | None,
    where: tuple[str | None, str | None],
    what: str,
) -> None:
    """``ctx.load_cert_chain`` with errors that say which file and what is wrong with it."""
    pem = _readable(certificate, f"{what} certificate", where[0])
    if key is not None:
        _readable(key, f"{what} private_key", where[1])
    try:
        ctx.load_cert_chain(certificate, key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            message = (
                f"the private key {key or certificate} does not match certificate {certificate}"
            )
            raise ConfigError(message, where[1] or where[0]) from None
        raise ConfigError(
            f"{what} certificate {certificate} / private_key {key or '(in the same file)'}: "
            f"not a PEM certificate and unencrypted PEM key ({exc.reason or exc})",
            where[0],
        ) from None
    except ValueError:
        raise ConfigError(
            f"the private key {key or certificate} is encrypted; store it without a password "
            "(readable by the server's user only)",
            where[1] or where[0],
        ) from None
    _warn_validity(pem, certificate)


def _load_cas(ctx: ssl.SSLContext, cas: Path, what: str, where: str | None) -> None:
    _readable(cas, what, where)
    try:
        ctx.load_verify_locations(cafile=cas)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{what} {cas}: no PEM certificates ({exc.reason or exc})", where
        ) from None


def server_context(settings: Settings) -> ssl.SSLContext:
    """The context of our TLS listeners (the DICOM TLS port and HTTPS); see the module text.

    Raises ConfigError naming the setting when a file is missing, unreadable or unusable."""
    if settings.tls_certificate is None:
        raise ConfigError("TLS needs [tls] certificate", _location(settings, "tls_dicom_port"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(CIPHERS)
    ctx.options |= ssl.OP_NO_RENEGOTIATION  # RFC 9325 3.5: no client-initiated renegotiation
    ctx.sslsocket_class = SerialisedSSLSocket
    where = (_location(settings, "tls_certificate"), settings.location("tls_private_key"))
    _load_chain(ctx, settings.tls_certificate, settings.tls_private_key, where, "[tls]")
    if settings.tls_ca_certificates is not None:
        where_ca = _location(settings, "tls_ca_certificates")
        _load_cas(ctx, settings.tls_ca_certificates, "[tls] ca_certificates", where_ca)
    ctx.verify_mode = client_verify_mode(settings)
    return ctx


def client_verify_mode(settings: Settings) -> ssl.VerifyMode:
    """What our TLS listeners ask of clients: with ``ca_certificates`` a certificate is asked
    for and verified when sent (required with ``require_client_certificate``), else none."""
    if settings.tls_ca_certificates is None:
        return ssl.CERT_NONE
    return ssl.CERT_REQUIRED if settings.tls_require_client_certificate else ssl.CERT_OPTIONAL


@functools.lru_cache(maxsize=64)
def _client_context(
    cas: Path | None,
    certificate: Path | None,
    key: Path | None,
    check_hostname: bool,
    where: str,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server's certificate
    ctx.minimum_version = MINIMUM_VERSION
    ctx.set_ciphers(CIPHERS)
    ctx.sslsocket_class = SerialisedSSLSocket
    ctx.check_hostname = check_hostname
    if cas is not None:
        _load_cas(ctx, cas, "tls_ca_certificates", where)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if certificate is not None:
        _load_chain(ctx, certificate, key, (where, where), "client")
    return ctx


def client_context(settings: Settings, peer: Peer) -> ssl.SSLContext:
    """The context for our associations to ``peer`` (``tls = true`` in peers.toml)."""
    certificate: Path | None
    if peer.tls_certificate is not None:
        certificate, key = peer.tls_certificate, peer.tls_private_key
    else:
        certificate, key = settings.tls_certificate, settings.tls_private_key
    cas = peer.tls_ca_certificates or settings.tls_ca_certificates
    where = f"{settings.config_dir / 'peers.toml'} (peer {peer.ae_title})"
    return _client_context(cas, certificate, key, peer.tls_check_hostname, where)


def client_args(settings: Settings, peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    """``tls_args`` for pynetdicom's ``AE.associate`` to ``peer``: None for a plain peer."""
    if not peer.tls:
        return None
    return client_context(settings, peer), peer.host


def check(settings: Settings) -> ssl.SSLContext | None:
    """Build every context the settings call for, so that a bad file stops ``serve`` before
    anything listens; the server context, or None when nothing listens with TLS."""
    for peer in settings.peers:
        if peer.tls:
            client_context(settings, peer)
    if settings.dicom_tls or settings.tls_https:
        return server_context(settings)
    return None


def describe(exc: BaseException) -> str:
    """A short reason for a failed handshake, for the log and the audit trail."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL"):
            return f"not a TLS client ({reason}): plain DICOM or HTTP on the TLS port?"
        return reason
    if isinstance(exc, TimeoutError):
        return "no TLS handshake within the ACSE timeout"
    return str(exc) or exc.__class__.__name__


def accept(sock: ssl.SSLSocket, timeout: float) -> str | None:
    """The server side of the handshake on an accepted connection (PS3.15 B.12), on the
    association's own thread: a client that never completes it holds only its own thread, for
    at most ``timeout`` seconds.  None when it succeeded, else why it failed."""
    previous = sock.gettimeout()
    try:
        sock.settimeout(timeout)
        sock.do_handshake()
        sock.settimeout(previous)
    except (OSError, ValueError) as exc:  # SSLError, TimeoutError, a reset connection
        return describe(exc)
    return None
