"""A remote Dask scheduler reached over TLS through the project's own runner (issue #14).

The test makes a CA and one certificate for 127.0.0.1 (``cryptography``), starts ``dask
scheduler`` and one ``dask worker`` with ``--tls-ca-file/--tls-cert/--tls-key`` on
127.0.0.1 (stopped by process id), and runs a tiny Prefect flow on the runner built from
``AFFECTLOOP_DASK_ADDRESS=tls://…`` plus the ``AFFECTLOOP_DASK_TLS_*`` settings. Without
the certificates, a client cannot get in.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

import pytest

from core.processes import free_port, stop_process
from core.settings import get_settings

pytestmark = pytest.mark.service


def _write_pki(folder: Path) -> dict[str, Path]:
    """A CA, and a certificate signed by it for 127.0.0.1/localhost (server and client auth)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("affectloop test CA")).issuer_name(name("affectloop test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(paths["key"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return paths


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    """``dask scheduler`` + one ``dask worker`` speaking only TLS on 127.0.0.1; yields (address, pki)."""
    from distributed import Client
    from distributed.security import Security

    from tests.conftest import _start_dask

    scratch = tmp_path_factory.mktemp("dask-tls")
    pki = _write_pki(scratch)
    tls = ["--tls-ca-file", str(pki["ca"]), "--tls-cert", str(pki["cert"]), "--tls-key", str(pki["key"])]
    port = free_port()
    address = f"tls://127.0.0.1:{port}"
    procs = [_start_dask(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--protocol", "tls",
                          "--no-dashboard", *tls], scratch / "scheduler.log")]
    try:
        procs.append(_start_dask(["worker", address, "--host", "127.0.0.1", "--nthreads", "1", "--nworkers", "1",
                                  "--no-dashboard", "--local-directory", str(scratch / "w0"), *tls],
                                 scratch / "worker.log"))
        security = Security(tls_ca_file=str(pki["ca"]), tls_client_cert=str(pki["cert"]),
                            tls_client_key=str(pki["key"]), require_encryption=True)
        with Client(address, security=security, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
        yield address, pki
    finally:
        for proc in reversed(procs):
            stop_process(proc)


def test_runner_reaches_a_tls_scheduler_with_the_certificate_settings(prefect_api_url, tls_cluster, tmp_path):
    from prefect import flow, task

    from flows.runner import make_task_runner

    address, pki = tls_cluster
    settings = get_settings(data_root=tmp_path, dask_address=address, dask_tls_ca_file=pki["ca"],
                            dask_tls_cert=pki["cert"], dask_tls_key=pki["key"])

    @task
    def square(x: int) -> int:
        import socket

        return x * x, socket.gethostname()

    @flow(task_runner=make_task_runner(settings))
    def tiny() -> list:
        return [future.result() for future in square.map([1, 2, 3])]

    state = tiny(return_state=True)
    assert state.is_completed(), state.message
    assert [value for value, _ in state.result()] == [1, 4, 9]

    # The runner's own client is encrypted with our certificates, and the work ran on the TLS worker.
    runner = make_task_runner(settings)
    with runner:
        client = runner.client  # built on first use, through the runner's own code path
        assert client.security.require_encryption and client.scheduler.address.startswith("tls://")
        assert client.submit(sum, [20, 22], pure=False).result(timeout=60) == 42
        assert len(client.scheduler_info()["workers"]) == 1


def test_a_tls_scheduler_refuses_a_client_without_the_certificates(tls_cluster, tmp_path):
    from distributed import Client

    from flows.runner import dask_security

    address, pki = tls_cluster
    with pytest.raises((OSError, TypeError, ValueError)):
        Client(address.replace("tls://", "tcp://"), timeout=5)  # plain TCP to the TLS port: no handshake
    with pytest.raises(ValueError, match="AFFECTLOOP_DASK_TLS_CA_FILE"):
        dask_security(get_settings(data_root=tmp_path, dask_address=address))  # tls:// without certificates
