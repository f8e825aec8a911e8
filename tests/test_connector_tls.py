"""TLS: both connectors through a Mosquitto TLS listener, with a certificate made for the test.

The fast connector's transport reads into the protocol's own buffer
(`asyncio.BufferedProtocol`); under TLS those reads come through the event
loop's SSL protocol instead of the socket, so this runs that path on both
loops, with payloads from a few bytes to several read buffers long.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker import Mosquitto
from conftest import ConnectorFactory
from observer import Recorder

pytestmark = [pytest.mark.broker, pytest.mark.usefixtures("loop_guard")]


@pytest.fixture(scope="module")
def certificate() -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for 127.0.0.1 and its key (openssl CLI)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    # Not under pytest's tmp_path (mode 0700): mosquitto, started as root,
    # reads the files as its own user (as tests/broker.py explains).
    directory = Path(tempfile.mkdtemp(prefix="cascade-tls-"))
    directory.chmod(0o755)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    cert.chmod(0o644)
    key.chmod(0o644)
    yield cert, key
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def tls_broker(certificate: tuple[Path, Path]) -> Iterator[Mosquitto]:
    """A Mosquitto whose only listener speaks TLS with `certificate`."""
    cert, key = certificate
    with Mosquitto(extra_config=f"certfile {cert}\nkeyfile {key}") as mosquitto:
        yield mosquitto


@pytest.fixture
def client_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    """Trusts the test certificate only, and checks the host name."""
    return ssl.create_default_context(cafile=str(certificate[0]))


@pytest.fixture
async def tls_factory(connector_impl: str, tls_broker: Mosquitto) -> Iterator[ConnectorFactory]:
    factory = ConnectorFactory(connector_impl, tls_broker)
    try:
        yield factory
    finally:
        await factory.aclose()


async def test_messages_of_every_size_round_trip_over_tls(tls_factory, client_context):
    """Publish and receive through TLS, payloads up to several 256 KiB read buffers, in order."""
    subscriber = tls_factory(tls_context=client_context)
    publisher = tls_factory(tls_context=client_context)
    await subscriber.connect()
    await publisher.connect()
    received = Recorder("tls")
    await subscriber.subscribe("tls/+/events", received)
    payloads = [{"i": i, "blob": "x" * size} for i, size in enumerate((0, 100, 70_000, 600_000, 5))]

    for payload in payloads:
        await publisher.publish("tls/run-1/events", payload, qos=1)

    await received.wait(len(payloads))
    assert received.calls == [("tls/run-1/events", payload) for payload in payloads]
    assert subscriber.stats()["decode_errors"] == 0


async def test_a_certificate_the_client_does_not_trust_fails_the_connect(tls_factory):
    """Without the test CA the handshake fails at connect(): nothing is sent in the clear."""
    connector = tls_factory(tls_context=ssl.create_default_context(), connect_timeout=5.0)
    with pytest.raises((ssl.SSLError, OSError, ConnectionError)):
        await connector.connect()
