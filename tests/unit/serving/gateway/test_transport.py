"""Transport and keys without Ray: ``server.tls`` is checked when the config is built, the
gateway's HTTP server serves HTTPS (TLS 1.2+) with it and ``loom status`` trusts it through
``--cacert``, a public bind without TLS is warned of, the gateway is given key digests only,
and a local Ray is made to listen on loopback when Loom does."""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from models.settings import LoomEnv
from serving.cli import loopback_ray_env, run_status
from serving.config import ConfigError, default_config, parse_config
from serving.config.server import ServerConfig
from serving.gateway.http_server import HttpServer, server_ssl_context
from serving.gateway.keys import KeyCheck, hash_server_keys
from serving.server import gateway_config, plaintext_warning

x509 = pytest.importorskip("cryptography.x509", reason="cryptography makes the test's cert")


def write_self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, and its key, as PEM files."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loom-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = folder / "cert.pem", folder / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_self_signed(tmp_path_factory.mktemp("tls"))


MODELS = [{"name": "m", "source": "m", "task": "embed"}]


# ---- server.tls in the config -----------------------------------------------------------------


def test_tls_with_readable_files_is_accepted(cert: tuple[Path, Path]) -> None:
    certfile, keyfile = cert
    tls = {"certfile": str(certfile), "keyfile": str(keyfile)}
    config = parse_config({"server": {"tls": tls}, "models": MODELS})
    assert config.server.tls is not None
    assert config.server.scheme == "https"


def test_tls_with_a_missing_file_is_a_config_error_naming_the_field(
    cert: tuple[Path, Path], tmp_path: Path
) -> None:
    tls = {"certfile": str(cert[0]), "keyfile": str(tmp_path / "absent.pem")}
    with pytest.raises(ConfigError, match=r"server\.tls\.keyfile: .*not a readable file"):
        parse_config({"server": {"tls": tls}, "models": MODELS})


def test_tls_under_proxy_ingress_is_accepted_serve_takes_the_files(
    cert: tuple[Path, Path],
) -> None:
    tls = {"certfile": str(cert[0]), "keyfile": str(cert[1])}
    config = parse_config({"server": {"tls": tls, "ingress": "proxy"}, "models": MODELS})
    assert config.server.tls is not None


# ---- HTTPS served, and trusted by the client ---------------------------------------------------


@pytest.fixture
def https_server(cert: tuple[Path, Path]) -> Iterator[tuple[int, ssl.SSLContext]]:
    """An ``HttpServer`` over TLS on a thread's loop, answering ``/v1/status``."""
    import threading

    app = FastAPI()

    @app.get("/v1/status")
    async def status() -> dict[str, object]:
        return {"application": "loom", "deployments": {}}

    context = server_ssl_context(str(cert[0]), str(cert[1]))
    server = HttpServer(app, host="127.0.0.1", port=0, ssl_context=context)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(30)
    try:
        yield server.port, context
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_server_context_refuses_tls_before_1_2(cert: tuple[Path, Path]) -> None:
    context = server_ssl_context(str(cert[0]), str(cert[1]))
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_http_server_serves_https_that_a_client_trusting_the_cert_reads(
    https_server: tuple[int, ssl.SSLContext], cert: tuple[Path, Path]
) -> None:
    port, _ = https_server
    trusted = ssl.create_default_context(cafile=str(cert[0]))
    answer = httpx.get(f"https://127.0.0.1:{port}/v1/status", verify=trusted, timeout=10)
    assert answer.status_code == 200
    with pytest.raises(httpx.ConnectError):  # the system's CAs do not know a self-signed cert
        httpx.get(f"https://127.0.0.1:{port}/v1/status", timeout=10)
    with pytest.raises(httpx.RemoteProtocolError):  # plain HTTP to a TLS port: no answer
        httpx.get(f"http://127.0.0.1:{port}/v1/status", timeout=10)


def test_loom_status_reads_https_with_cacert_and_refuses_without(
    https_server: tuple[int, ssl.SSLContext],
    cert: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    port, _ = https_server
    monkeypatch.delenv("LOOM_CA_FILE", raising=False)
    monkeypatch.delenv("LOOM_API_KEYS", raising=False)
    url = f"https://127.0.0.1:{port}"
    args = argparse.Namespace(url=url, json=True, cacert=str(cert[0]))
    assert run_status(args) == 0
    assert json.loads(capsys.readouterr().out)["application"] == "loom"
    assert run_status(argparse.Namespace(url=url, json=True, cacert=None)) == 1
    assert "CERTIFICATE_VERIFY_FAILED" in capsys.readouterr().err
    monkeypatch.setenv("LOOM_CA_FILE", str(cert[0]))  # the environment's CA file does as well
    assert LoomEnv.from_environ().ca_file == str(cert[0])
    assert run_status(argparse.Namespace(url=url, json=True, cacert=None)) == 0


# ---- the plain-HTTP warning --------------------------------------------------------------------


def test_a_public_bind_without_tls_is_warned_of_naming_the_risk() -> None:
    config = default_config(cpus=1)
    public = config.model_copy(
        update={"server": ServerConfig(host="0.0.0.0", api_keys=("k" * 20,))}
    )
    warning = plaintext_warning(public)
    assert warning is not None
    assert "0.0.0.0" in warning
    assert "in clear" in warning
    assert "server.tls" in warning


def test_loopback_or_tls_is_not_warned_of(cert: tuple[Path, Path]) -> None:
    config = default_config(cpus=1)
    assert plaintext_warning(config) is None  # 127.0.0.1
    tls = {"certfile": str(cert[0]), "keyfile": str(cert[1])}
    public_tls = parse_config(
        {"server": {"host": "0.0.0.0", "api_keys": ["k" * 20], "tls": tls}, "models": MODELS}
    )
    assert plaintext_warning(public_tls) is None


# ---- keys: digests only, to the gateway ---------------------------------------------------------


def test_the_gateway_config_holds_digests_never_the_keys() -> None:
    server = ServerConfig(api_keys=("plain-secret-one",), admin_api_keys=("admin-secret-two",))
    config = default_config(cpus=1).model_copy(update={"server": server})
    given = json.dumps(gateway_config(config))
    assert "plain-secret-one" not in given
    assert "admin-secret-two" not in given
    keys = KeyCheck.from_digests(ServerConfig.model_validate(gateway_config(config)["server"]))
    assert keys.on
    assert keys.accepts("plain-secret-one")
    assert keys.accepts("admin-secret-two")
    assert keys.accepts("admin-secret-two", admin=True)
    assert not keys.accepts("plain-secret-one", admin=True)  # an ordinary key is not admin
    assert not keys.accepts("plain-secret-on")
    assert not keys.accepts("")


def test_each_process_salts_differently_so_digests_do_not_repeat() -> None:
    server = ServerConfig(api_keys=("same-key-everywhere",))
    assert hash_server_keys(server).keys != hash_server_keys(server).keys


def test_digests_parse_only_in_their_own_form() -> None:
    with pytest.raises(ValueError, match="not a key digest"):
        KeyCheck.from_digests(ServerConfig(api_keys=("a-plain-key-not-a-digest",)))
    assert not KeyCheck.from_digests(ServerConfig()).on  # no keys: keys off


# ---- a local Ray on loopback ---------------------------------------------------------------------


def test_a_loopback_loom_starts_ray_without_cluster_addresses() -> None:
    config = default_config(cpus=1)
    assert loopback_ray_env(config, {}) == {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def test_a_public_loom_or_a_cluster_to_join_leaves_ray_its_addresses() -> None:
    config = default_config(cpus=1)
    assert loopback_ray_env(config, {"RAY_ADDRESS": "10.0.0.5:6379"}) == {}
    public = config.model_copy(
        update={"server": ServerConfig(host="0.0.0.0", api_keys=("k" * 20,))}
    )
    assert loopback_ray_env(public, {}) == {}
