"""DICOM TLS (PS3.15 Annex B) and HTTPS with a self-signed CA made here.

A server with ``[tls]`` configured takes associations from DCMTK (``echoscu``/``storescu
+tls``) and pynetdicom on its TLS port and answers QIDO over HTTPS; a plain association or
plain HTTP to a TLS port fails without hurting the server; ``require_client_certificate``
refuses clients without a certificate from the configured CA; our ``echo`` command and C-MOVE
sub-operations reach peers with ``tls = true`` over TLS.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from server.config import load_settings
from server.errors import ConfigError
from tests.helpers import ROOT, ServerProcess, free_port, have, run, server_cli
from tools import procs
from tools.generate import StudySpec, ct_series, write
from tools.procs import NODELAY_ENV, echo, stop_process, wait_until

# --- a small PKI ------------------------------------------------------------------------------


@dataclass
class Pki:
    """PEM files: a CA, a server certificate (also usable as a client one) and a client's, and
    a client certificate from a CA nobody trusts."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _key() -> rsa.RSAPrivateKey:
    # RSA: DCMTK's BCP 195 profiles only offer RSA-authenticated cipher suites.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: rsa.RSAPrivateKey,
    issuer: tuple[x509.Name, rsa.RSAPrivateKey] | None,
    *,
    ca: bool = False,
    usages: tuple[x509.ObjectIdentifier, ...] = (),
    names: tuple[x509.GeneralName, ...] = (),
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(directory: Path, stem: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> Path:
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / f"{stem}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return directory / f"{stem}.pem"


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, rogue_ca_key = _key(), _key()
    ca = _certificate("Test Imaging CA", ca_key, None, ca=True)
    rogue_ca = _certificate("Rogue CA", rogue_ca_key, None, ca=True)
    both = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)
    server_key, client_key, rogue_key = _key(), _key(), _key()
    import ipaddress

    server = _certificate(
        "localhost",
        server_key,
        (ca.subject, ca_key),
        usages=both,
        names=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
    )
    client = _certificate(
        "MODALITY", client_key, (ca.subject, ca_key), usages=(ExtendedKeyUsageOID.CLIENT_AUTH,)
    )
    rogue = _certificate(
        "INTRUDER",
        rogue_key,
        (rogue_ca.subject, rogue_ca_key),
        usages=(ExtendedKeyUsageOID.CLIENT_AUTH,),
    )
    (directory / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=directory / "ca.pem",
        server_cert=_write(directory, "server", server, server_key),
        server_key=directory / "server.key",
        client_cert=_write(directory, "client", client, client_key),
        client_key=directory / "client.key",
        rogue_cert=_write(directory, "rogue", rogue, rogue_key),
        rogue_key=directory / "rogue.key",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- clients ----------------------------------------------------------------------------------


def client_context(pki: Pki, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    """Verifies our server against the test CA; presents ``cert`` (certificate, key) if given."""
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        ctx.load_cert_chain(cert[0], cert[1])
    return ctx


def tls_echo(port: int, ctx: ssl.SSLContext, calling: str = "ECHOSCU") -> bool:
    """C-ECHO over TLS; False when the association is not established."""
    return echo(port, calling=calling, tls_args=(ctx, "127.0.0.1"), timeout=5)


def plain_association(port: int) -> bool:
    ae = AE(ae_title="PLAIN")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="IMAGING")
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    return established


def https_client(pki: Pki) -> httpx.Client:
    return httpx.Client(verify=client_context(pki), timeout=30)


@dataclass
class TlsServer(ServerProcess):
    """Our server with a DICOM TLS port and HTTPS; ready when both answer over TLS."""

    tls_port: int = field(default_factory=free_port)
    pki: Pki | None = None
    probe_cert: tuple[Path, Path] | None = None  # what the readiness probe presents

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.http_port}"

    def ready(self) -> bool:
        assert self.pki is not None
        ctx = client_context(self.pki, self.probe_cert)
        if not tls_echo(self.tls_port, ctx, "PROBE"):
            return False
        with httpx.Client(verify=ctx, timeout=10) as client:
            return client.get(f"{self.base_url}/health").status_code == 200


def tls_config(directory: Path, pki: Pki, tls_port: int, extra: str = "", peers: str = "") -> Path:
    """server.toml with [tls]; the certificates are copied next to it and named relatively
    (relative paths resolve against the configuration directory)."""
    directory.mkdir(parents=True, exist_ok=True)
    certs = directory / "tls"
    certs.mkdir(exist_ok=True)
    for source in (pki.ca, pki.server_cert, pki.server_key):
        (certs / source.name).write_bytes(source.read_bytes())
    (directory / "server.toml").write_text(
        '[ae]\ntitle = "IMAGING"\n\n[tls]\n'
        'certificate = "tls/server.pem"\nprivate_key = "tls/server.key"\n'
        'ca_certificates = "tls/ca.pem"\n'
        f"dicom_port = {tls_port}\nhttps = true\n{extra}"
    )
    (directory / "peers.toml").write_text(peers)
    return directory


@pytest.fixture(scope="module")
def destination_port() -> int:
    """Where the C-MOVE test's storescp +tls listens (peer TLSDEST of :func:`tls_server`)."""
    return free_port()


@pytest.fixture(scope="module")
def tls_server(
    pki: Pki, tmp_path_factory: pytest.TempPathFactory, destination_port: int
) -> Iterator[TlsServer]:
    """[tls] with a CA (client certificates verified when sent, not required), HTTPS, the
    plain DICOM port still open, and a move destination with tls = true."""
    root = tmp_path_factory.mktemp("tls-server")
    tls_port = free_port()
    peers = (
        '[[peer]]\nae_title = "TLSDEST"\nhost = "127.0.0.1"\n'
        f'port = {destination_port}\ntls = true\ntls_ca_certificates = "tls/ca.pem"\n'
    )
    config = tls_config(root / "config", pki, tls_port, peers=peers)
    server = TlsServer(root / "data", config, tls_port=tls_port, pki=pki)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls-study")
    spec = StudySpec(patient_id="TLS-PAT-1", patient_name="SECURE^SAM", accession="TLSACC1")
    for ds in ct_series(spec, 3, 64):
        write(ds, out)
    return out


def _study_uid(directory: Path) -> str:
    return str(dcmread(next(directory.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def _qido(server: TlsServer, pki: Pki, study_uid: str) -> list[dict[str, object]]:
    with https_client(pki) as client:
        response = client.get(
            f"{server.base_url}/dicom-web/studies", params={"StudyInstanceUID": study_uid}
        )
    assert response.status_code == 200, response.text
    return list(response.json())


# --- DCMTK against our TLS port ----------------------------------------------------------------


@pytest.mark.dcmtk
def test_dcmtk_echo_and_store_over_tls(
    tls_server: TlsServer, pki: Pki, study: Path, dcmtk: None
) -> None:
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    port = str(tls_server.tls_port)
    out = run(["echoscu", *tls, "-aec", "IMAGING", "127.0.0.1", port], env=NODELAY_ENV)
    assert out.returncode == 0, out.stdout + out.stderr

    out = run(["storescu", *tls, "-aec", "IMAGING", "+sd", "127.0.0.1", port, str(study)])
    assert out.returncode == 0, out.stdout + out.stderr
    found = _qido(tls_server, pki, _study_uid(study))
    assert len(found) == 1
    assert found[0]["00201208"]["Value"] == [3]  # type: ignore[index]

    # DCMTK without a client certificate is fine here: not required by this server.
    anonymous = ["+tla", "+cf", str(pki.ca)]
    out = run(["echoscu", *anonymous, "-aec", "IMAGING", "127.0.0.1", port])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.dcmtk
def test_dcmtk_refuses_our_certificate_without_the_ca(tls_server: TlsServer, dcmtk: None) -> None:
    """The client side verifies us: DCMTK without our CA does not talk to us."""
    out = run(["echoscu", "+tla", "-aec", "IMAGING", "127.0.0.1", str(tls_server.tls_port)])
    assert out.returncode != 0
    assert tls_echo(tls_server.tls_port, client_context(tls_server.pki))  # type: ignore[arg-type]


# --- pynetdicom: C-FIND over TLS, plain clients on the TLS port --------------------------------


def test_find_over_tls(tls_server: TlsServer, pki: Pki, study: Path) -> None:
    """C-FIND over TLS: the pending responses leave through the fast path's own writes."""
    from tests.helpers import store_as

    datasets = [dcmread(p) for p in sorted(study.iterdir())]
    store_as(tls_server.port, "PLAINMOD", datasets)  # the plain port still works
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ctx = client_context(pki, (pki.client_cert, pki.client_key))
    assoc = ae.associate(
        "127.0.0.1", tls_server.tls_port, ae_title="IMAGING", tls_args=(ctx, "127.0.0.1")
    )
    assert assoc.is_established
    try:
        from pydicom.dataset import Dataset

        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = _study_uid(study)
        query.SOPInstanceUID = ""
        answers = [
            identifier
            for status, identifier in assoc.send_c_find(
                query, StudyRootQueryRetrieveInformationModelFind
            )
            if status and status.Status == 0xFF00
        ]
    finally:
        assoc.release()
    assert len(answers) == 3


def test_plain_clients_on_the_tls_port_fail_cleanly(tls_server: TlsServer, pki: Pki) -> None:
    ctx = client_context(pki)
    # A client that connects and says nothing holds only its own thread: others get through.
    with socket.create_connection(("127.0.0.1", tls_server.tls_port)) as silent:
        assert not plain_association(tls_server.tls_port)
        with socket.create_connection(("127.0.0.1", tls_server.tls_port)) as garbage:
            garbage.sendall(b"GET / HTTP/1.0\r\n\r\n")
            garbage.settimeout(10)
            try:
                answer = garbage.recv(100)
            except ConnectionResetError:  # closed with our request unread
                answer = b""
            assert answer == b"" or answer[0] == 0x15  # closed, or a TLS alert: never a hang
        assert tls_echo(tls_server.tls_port, ctx)
        assert silent.fileno() >= 0
    assert tls_echo(tls_server.tls_port, ctx)
    assert plain_association(tls_server.port)  # the plain port is a plain port
    audit = (tls_server.data_dir / "audit.log").read_text()
    assert '"action":"dimse.tls"' in audit and '"outcome":"denied"' in audit


def test_unknown_ca_client_is_refused(tls_server: TlsServer, pki: Pki) -> None:
    """A certificate is verified when sent, even where none is required."""
    assert not tls_echo(tls_server.tls_port, client_context(pki, (pki.rogue_cert, pki.rogue_key)))
    assert tls_echo(tls_server.tls_port, client_context(pki, (pki.client_cert, pki.client_key)))


# --- HTTPS ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_https(tls_server: TlsServer, pki: Pki) -> None:
    with https_client(pki) as client:
        assert client.get(f"{tls_server.base_url}/health").status_code == 200
        studies = client.get(f"{tls_server.base_url}/dicom-web/studies")
        assert studies.status_code in (200, 204)
    plain_url = f"http://127.0.0.1:{tls_server.http_port}/health"
    with pytest.raises(httpx.HTTPError):
        httpx.get(plain_url, timeout=10)
    # TLS 1.1 and older are refused (PS3.15 B.12, RFC 8996).
    old = client_context(pki)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")  # a client that would speak TLS 1.1
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((httpx.HTTPError, ssl.SSLError)):
        httpx.get(f"{tls_server.base_url}/health", verify=old, timeout=10)
    with https_client(pki) as client:  # and the server still serves
        assert client.get(f"{tls_server.base_url}/health").status_code == 200


def test_websocket_over_wss(tls_server: TlsServer, pki: Pki) -> None:
    import json

    from websockets.sync.client import connect

    url = tls_server.base_url.replace("https://", "wss://") + "/ws/v1"
    with connect(url, ssl=client_context(pki), open_timeout=10) as ws:
        ws.send(json.dumps({"action": "ping"}))
        assert json.loads(ws.recv(timeout=10))["event"] == "pong"


# --- require_client_certificate, TLS only --------------------------------------------------------


def test_required_client_certificate_and_tls_only(pki: Pki, tmp_path: Path) -> None:
    tls_port = free_port()
    config = tls_config(
        tmp_path / "config",
        pki,
        tls_port,
        "require_client_certificate = true\nplain_dicom = false\n",
    )
    server = TlsServer(
        tmp_path / "data",
        config,
        tls_port=tls_port,
        pki=pki,
        probe_cert=(pki.client_cert, pki.client_key),
    )
    server.start()
    try:
        with_cert = client_context(pki, (pki.client_cert, pki.client_key))
        assert tls_echo(tls_port, with_cert)
        assert not tls_echo(tls_port, client_context(pki))
        assert not tls_echo(tls_port, client_context(pki, (pki.rogue_cert, pki.rogue_key)))
        assert tls_echo(tls_port, with_cert)  # still serving
        with pytest.raises(OSError):  # the plain port is not opened
            socket.create_connection(("127.0.0.1", server.port), timeout=5).close()
        # HTTPS asks for the certificate too.
        with httpx.Client(verify=with_cert, timeout=30) as client:
            assert client.get(f"{server.base_url}/health").status_code == 200
        with pytest.raises((httpx.HTTPError, ssl.SSLError)), https_client(pki) as client:
            client.get(f"{server.base_url}/health")
        if have("echoscu"):
            out = run(["echoscu", "+tla", "+cf", str(pki.ca), "127.0.0.1", str(tls_port)])
            assert out.returncode != 0
            tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
            out = run(["echoscu", *tls, "127.0.0.1", str(tls_port)])
            assert out.returncode == 0, out.stdout + out.stderr
        log = server.log()
        assert "TLS handshake with 127.0.0.1" in log and "refused" in log
    finally:
        server.stop()


# --- our SCU side: echo and C-MOVE to peers with tls = true --------------------------------------


@pytest.fixture
def tls_peer(pki: Pki) -> Iterator[int]:
    """A pynetdicom Verification SCP on TLS that requires a client certificate from the CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_cert_chain(pki.server_cert, pki.server_key)
    ae = AE(ae_title="TLSPEER")
    ae.add_supported_context(Verification)
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ctx)
    try:
        yield port
    finally:
        scp.shutdown()


def _peer_config(directory: Path, pki: Pki, port: int, extra: str = "") -> Path:
    """A client-side configuration: our [tls] certificate is presented to the peer."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.toml").write_text(
        f'[tls]\ncertificate = "{pki.server_cert}"\nprivate_key = "{pki.server_key}"\n'
    )
    (directory / "peers.toml").write_text(
        f'[[peer]]\nae_title = "TLSPEER"\nhost = "127.0.0.1"\nport = {port}\ntls = true\n'
        f'tls_ca_certificates = "{pki.ca}"\n{extra}'
    )
    return directory


def test_echo_command_to_tls_peer(pki: Pki, tls_peer: int, tmp_path: Path) -> None:
    config = _peer_config(tmp_path / "config", pki, tls_peer)
    result = server_cli("echo", config, tmp_path / "data", "TLSPEER")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "status 0x0000" in result.stdout

    # The peer's certificate must chain to the CA we were given for it.
    (tmp_path / "other").mkdir()
    other = make_pki(tmp_path / "other-pki")
    wrong = _peer_config(tmp_path / "wrong", pki, tls_peer)
    text = (wrong / "peers.toml").read_text().replace(str(pki.ca), str(other.ca))
    (wrong / "peers.toml").write_text(text)
    result = server_cli("echo", wrong, tmp_path / "data", "TLSPEER")
    assert result.returncode == 1
    assert "over TLS failed" in result.stderr

    # Without a client certificate the peer (which requires one) refuses us.
    bare = tmp_path / "bare"
    _peer_config(bare, pki, tls_peer)
    (bare / "server.toml").write_text("")
    result = server_cli("echo", bare, tmp_path / "data", "TLSPEER")
    assert result.returncode == 1


@pytest.mark.dcmtk
def test_move_to_tls_destination(
    tls_server: TlsServer,
    pki: Pki,
    study: Path,
    tmp_path: Path,
    destination_port: int,
    dcmtk: None,
) -> None:
    """C-MOVE sub-operations to a destination with tls = true: DCMTK storescp +tls, which
    requires our certificate (the [tls] one, presented as a client certificate)."""
    from tests.helpers import store_as

    store_as(tls_server.port, "MOD", [dcmread(p) for p in sorted(study.iterdir())])
    out_dir = tmp_path / "received"
    out_dir.mkdir()
    tls = ["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca)]
    proc = subprocess.Popen(
        [
            procs.dcmtk("storescp"),
            "-aet",
            "TLSDEST",
            "-od",
            str(out_dir),
            *tls,
            str(destination_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=NODELAY_ENV,
    )
    try:
        probe = client_context(pki, (pki.client_cert, pki.client_key))
        wait_until(lambda: _echo_as(destination_port, probe, "TLSDEST"), "storescp", 20, proc)
        move = ["movescu", "-v", "-S", "-aec", "IMAGING", "-aem", "TLSDEST"]
        move += ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={_study_uid(study)}"]
        result = run([*move, "127.0.0.1", str(tls_server.port)])
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Received Final Move Response (Success)" in result.stderr
    finally:
        stop_process(proc, 10)  # type: ignore[arg-type]
    assert len(list(out_dir.iterdir())) == 3


def _echo_as(port: int, ctx: ssl.SSLContext, called: str) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 3
    assoc = ae.associate("127.0.0.1", port, ae_title=called, tls_args=(ctx, "127.0.0.1"))
    if not assoc.is_established:
        return False
    assoc.release()
    return True


# --- configuration errors -----------------------------------------------------------------------


def _settings_dir(tmp_path: Path, server: str, peers: str = "") -> Path:
    (tmp_path / "server.toml").write_text(server)
    (tmp_path / "peers.toml").write_text(peers)
    return tmp_path


@pytest.mark.parametrize(
    ("server", "peers", "where", "message"),
    [
        ("[tls]\ndicom_port = 2762\n", "", "server.toml:2", "needs [tls] certificate"),
        ("[tls]\n\nhttps = true\n", "", "server.toml:3", "needs [tls] certificate"),
        (
            '[tls]\ncertificate = "c.pem"\nrequire_client_certificate = true\n',
            "",
            "server.toml:3",
            "needs [tls] ca_certificates",
        ),
        ("[tls]\nplain_dicom = false\n", "", "server.toml:2", "no DICOM port would be open"),
        (
            '[ae]\nport = 2762\n[tls]\ncertificate = "c.pem"\ndicom_port = 2762\n',
            "",
            "server.toml:5",
            "PS3.15 B.1",
        ),
        ("[tls]\ndicom_port = 70000\n", "", "server.toml:2", "out of range"),
        ("[tls]\nhttps = 3\n", "", "server.toml:2", "expected true or false"),
        (
            "",
            '[[peer]]\nae_title = "A"\nhost = "h"\nport = 1\ntls_ca_certificates = "ca.pem"\n',
            "peers.toml:5",
            "without tls = true",
        ),
    ],
)
def test_config_errors(tmp_path: Path, server: str, peers: str, where: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(_settings_dir(tmp_path, server, peers), environ={})
    assert where in str(info.value)
    assert message in str(info.value)


def test_config_paths_and_environment(tmp_path: Path) -> None:
    d = _settings_dir(
        tmp_path,
        '[tls]\ncertificate = "tls/s.pem"\nprivate_key = ""\ndicom_port = 2762\n',
        '[[peer]]\nae_title = "A"\nhost = "h"\nport = 1\ntls = true\n'
        'tls_ca_certificates = "peer-ca.pem"\n',
    )
    s = load_settings(d, environ={})
    assert s.tls_certificate == d.resolve() / "tls" / "s.pem"
    assert s.tls_private_key is None and s.tls_plain_dicom and not s.tls_https
    assert s.peers[0].tls and s.peers[0].tls_ca_certificates == d.resolve() / "peer-ca.pem"
    env = {"IMAGING_TLS_HTTPS": "true", "IMAGING_TLS_DICOM_PORT": "0"}
    s = load_settings(d, environ=env)
    assert s.tls_https and s.tls_dicom_port == 0
    assert load_settings(_settings_dir(tmp_path, ""), environ={}).tls_certificate is None


def _serve(config: Path, data: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "server", "--config", str(config), "serve"]
    cmd += ["--data-dir", str(data), "--dimse-port", str(free_port())]
    return subprocess.run(
        [*cmd, "--http-port", str(free_port())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "IMAGING_AI_ENABLED": "false"},
    )


def test_start_up_errors_name_the_file(pki: Pki, tmp_path: Path) -> None:
    config = tls_config(tmp_path / "config", pki, free_port())
    toml = config / "server.toml"
    text = toml.read_text()

    toml.write_text(text.replace("tls/server.pem", "tls/missing.pem"))
    result = _serve(config, tmp_path / "data")
    assert result.returncode == 2
    assert "server.toml:5" in result.stderr and "cannot read" in result.stderr
    assert "missing.pem" in result.stderr

    toml.write_text(text.replace("tls/server.key", "tls/other.key"))
    (config / "tls" / "other.key").write_bytes(pki.client_key.read_bytes())
    result = _serve(config, tmp_path / "data")
    assert result.returncode == 2
    assert "server.toml:6" in result.stderr and "does not match" in result.stderr

    toml.write_text(text.replace("tls/server.key", "tls/ca.pem"))  # not a key
    result = _serve(config, tmp_path / "data")
    assert result.returncode == 2 and "not a PEM certificate and unencrypted PEM key" in (
        result.stderr
    )

    toml.write_text(text.replace("tls/ca.pem", "tls/server.key"))  # no certificates in it
    result = _serve(config, tmp_path / "data")
    assert result.returncode == 2 and "server.toml:7" in result.stderr
