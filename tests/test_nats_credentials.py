"""Every way bacq authenticates to NATS works against a real nats-server: token, nkey, mutual TLS.

(User/password per role is tests/test_nats_auth.py.) Certificates are made here with openssl.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bacq.auth import new_user_nkey
from bacq.devstack import NatsServer


@pytest.fixture
def nats_with() -> Iterator[Callable[..., NatsServer]]:
    started: list[NatsServer] = []

    def start(where: Path, *args: str) -> NatsServer:
        server = NatsServer(where / "store", where / "nats.log", args=list(args))
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


def bacq(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BACQ_NATS_")}
    return subprocess.run(
        [sys.executable, "-m", "bacq", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
        check=False,
    )


def test_a_token_from_a_file_is_accepted_and_a_wrong_one_refused(
    nats_with: Callable[..., NatsServer], tmp_path: Path
) -> None:
    server = nats_with(tmp_path, "-js", "-sd", str(tmp_path / "js"), "--auth", "s3cret-token")
    token = tmp_path / "token"
    token.write_text("s3cret-token\n")
    ok = bacq("list", "--nats", server.url, "--nats-token-file", str(token))
    assert ok.returncode == 0, ok.stderr
    wrong = bacq("list", "--nats", server.url, BACQ_NATS_TOKEN="nope")
    assert wrong.returncode == 1
    assert "authorization violation" in wrong.stderr


def test_an_nkey_seed_file_authenticates(
    nats_with: Callable[..., NatsServer], tmp_path: Path
) -> None:
    seed, public = new_user_nkey()
    assert seed.startswith("SU")
    assert public.startswith("U")
    config = tmp_path / "nkey.conf"
    config.write_text(
        f"jetstream {{ store_dir: {tmp_path / 'js'} }}\n"
        f"authorization {{ users: [ {{ nkey: {public} }} ] }}\n"
    )
    server = nats_with(tmp_path, "-c", str(config))
    seed_file = tmp_path / "user.nk"
    seed_file.write_text(seed + "\n")
    seed_file.chmod(0o600)
    ok = bacq("list", "--nats", server.url, "--nats-nkey", str(seed_file))
    assert ok.returncode == 0, ok.stderr
    other_seed, _ = new_user_nkey()
    seed_file.write_text(other_seed + "\n")
    refused = bacq("list", "--nats", server.url, "--nats-nkey", str(seed_file))
    assert refused.returncode == 1
    assert "authorization violation" in refused.stderr


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    d = tmp_path / "pki"
    d.mkdir()
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=bacq test CA",
        "-keyout", "ca-key.pem", "-out", "ca.pem", cwd=d,
    )  # fmt: skip
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        (d / f"{name}.ext").write_text(ext + "\n")
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=bacq {name}",
            "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", cwd=d,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
            cwd=d,
        )  # fmt: skip
    return d


def test_mutual_tls_needs_the_ca_and_a_client_certificate(
    nats_with: Callable[..., NatsServer], tmp_path: Path, pki: Path
) -> None:
    server = nats_with(
        tmp_path,
        "-js", "-sd", str(tmp_path / "js"),
        "--tlsverify",
        "--tlscert", str(pki / "server.pem"),
        "--tlskey", str(pki / "server-key.pem"),
        "--tlscacert", str(pki / "ca.pem"),
    )  # fmt: skip
    url = server.url.replace("nats://", "tls://")
    ok = bacq(
        "list", "--nats", url,
        "--tls-ca", str(pki / "ca.pem"),
        "--tls-cert", str(pki / "client.pem"),
        "--tls-key", str(pki / "client-key.pem"),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    no_client_cert = bacq("list", "--nats", url, "--tls-ca", str(pki / "ca.pem"))
    assert no_client_cert.returncode == 1
    half = bacq("list", "--nats", url, "--tls-cert", str(pki / "client.pem"))
    assert half.returncode == 2  # a half-given setting is bad usage
    assert "needs its key" in half.stderr
