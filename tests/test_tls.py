"""TlsSocket: the plain-socket surface over ssl.SSLObject, and the TLS config keys."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import threading
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives import serialization
from support.certs import ServerCert, TestCA

from phxbroker.config.settings import load_config
from phxbroker.config.table import ConfigError
from phxbroker.config.tls import server_context
from phxbroker.transport.tls import TlsHandshakeError, TlsSocket

TIMEOUT = 5


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


@pytest.fixture
def cert(ca: TestCA) -> ServerCert:
    return ca.issue("server", ("localhost",))


def small_buffers(*socks: socket.socket) -> None:
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


class Client(threading.Thread):
    """A blocking TLS client in a thread: handshakes, says hello, waits for `go`, reads
    `expect` bytes, and with `unwrap` ends with close_notify (waiting for the server's)."""

    def __init__(
        self, sock: socket.socket, ca: TestCA, expect: int, *, unwrap: bool = False
    ) -> None:
        super().__init__(daemon=True)
        context = ssl.create_default_context(cafile=str(ca.ca_file))
        self.sock = sock
        self.sock.settimeout(TIMEOUT)
        self.tls = context.wrap_socket(
            sock, server_hostname="localhost", do_handshake_on_connect=False
        )
        self.expect = expect
        self.unwrap = unwrap
        self.go = threading.Event()
        self.received = bytearray()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.tls.do_handshake()
            self.tls.sendall(b"hello from the client")
            assert self.go.wait(TIMEOUT)
            while len(self.received) < self.expect:
                chunk = self.tls.recv(1000)  # small reads: the server keeps hitting a full socket
                if not chunk:
                    break
                self.received += chunk
            if self.unwrap:
                self.tls.unwrap()
        except BaseException as exc:
            self.error = exc


async def test_a_large_write_to_a_slow_reader_arrives_intact(ca: TestCA, cert: ServerCert) -> None:
    raw, peer = socket.socketpair()
    small_buffers(raw, peer)
    raw.setblocking(False)
    payload = os.urandom(3_000_000)
    client = Client(peer, ca, len(payload))
    client.start()
    tls = TlsSocket(raw, server_context(cert.cert_file, cert.key_file))
    await tls.handshake(TIMEOUT)

    with trio.fail_after(TIMEOUT):
        greeting = b""
        while len(greeting) < 21:
            try:
                greeting += tls.recv(100)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(tls)
    assert greeting == b"hello from the client"

    # Write as the websocket outbox does: whatever was not taken is offered again.
    short_writes = 0
    view = memoryview(payload)
    with trio.fail_after(30):
        while view:
            try:
                sent = tls.send(view)
            except BlockingIOError:
                sent = 0
            if sent < len(view):
                short_writes += 1
                client.go.set()
                await trio.lowlevel.wait_writable(tls)
            view = view[sent:]
    await trio.to_thread.run_sync(client.join, TIMEOUT)
    tls.close()

    assert client.error is None
    assert short_writes > 10  # the socket really was full, many times
    assert hashlib.sha256(client.received).digest() == hashlib.sha256(payload).digest()


async def test_recv_is_non_blocking_and_reports_the_end(ca: TestCA, cert: ServerCert) -> None:
    raw, peer = socket.socketpair()
    raw.setblocking(False)
    client = Client(peer, ca, 0, unwrap=True)
    client.start()
    tls = TlsSocket(raw, server_context(cert.cert_file, cert.key_file))
    await tls.handshake(TIMEOUT)
    with trio.fail_after(TIMEOUT):
        got = b""
        while len(got) < 21:
            try:
                got += tls.recv(100)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(tls)
    with pytest.raises(BlockingIOError):
        tls.recv(100)  # nothing more was sent

    client.go.set()  # the client sends close_notify and waits for ours
    with trio.fail_after(TIMEOUT):
        while True:
            try:
                assert tls.recv(100) == b""
                break
            except BlockingIOError:
                await trio.lowlevel.wait_readable(tls)
    tls.shutdown(socket.SHUT_WR)  # answers with close_notify
    await trio.to_thread.run_sync(client.join, TIMEOUT)
    assert not client.is_alive() and client.error is None
    tls.close()
    assert tls.fileno() == -1


async def test_plain_http_fails_the_handshake_with_a_clear_reason(cert: ServerCert) -> None:
    raw, peer = socket.socketpair()
    raw.setblocking(False)
    peer.sendall(b"GET / HTTP/1.1\r\nhost: example.com\r\n\r\n")
    tls = TlsSocket(raw, server_context(cert.cert_file, cert.key_file))
    with pytest.raises(TlsHandshakeError, match="it sent plain HTTP to the TLS port"):
        await tls.handshake(TIMEOUT)
    raw.close()
    peer.close()


async def test_a_silent_client_runs_out_of_time(cert: ServerCert) -> None:
    raw, peer = socket.socketpair()
    raw.setblocking(False)
    tls = TlsSocket(raw, server_context(cert.cert_file, cert.key_file))
    with pytest.raises(TlsHandshakeError, match=r"no complete TLS handshake within 0\.2 s"):
        await tls.handshake(0.2)
    peer.close()
    raw.close()


async def test_a_client_leaving_before_the_handshake_is_an_eof(cert: ServerCert) -> None:
    raw, peer = socket.socketpair()
    raw.setblocking(False)
    peer.close()
    tls = TlsSocket(raw, server_context(cert.cert_file, cert.key_file))
    with pytest.raises(EOFError):
        await tls.handshake(TIMEOUT)
    raw.close()


# -- config ------------------------------------------------------------------------------


def write_config(tmp_path: Path, server: str) -> Path:
    path = tmp_path / "phxbroker.toml"
    path.write_text(f"[server]\n{server}\n")
    return path


def test_tls_files_load_relative_to_the_config_file(tmp_path: Path, cert: ServerCert) -> None:
    config = load_config(write_config(tmp_path, 'tls_cert = "server.pem"\ntls_key = "server.key"'))
    assert isinstance(config.server.tls_context, ssl.SSLContext)
    assert "server.key" not in repr(config.server.tls_context)


@pytest.mark.parametrize(
    ("server", "error"),
    [
        ('tls_cert = "server.pem"', r"at server\.tls_key: is required when the other"),
        ('tls_key = "server.key"', r"at server\.tls_cert: is required when the other"),
        (
            'tls_cert = "missing.pem"\ntls_key = "server.key"',
            r"at server\.tls_cert: '.*missing\.pem' does not exist",
        ),
        (
            'tls_cert = "server.pem"\ntls_key = "other.key"',
            r"at server\.tls_key: the private key does not belong to the certificate",
        ),
        (
            'tls_cert = "server.pem"\ntls_key = "encrypted.key"',
            r"at server\.tls_key: the private key is encrypted; give it unencrypted",
        ),
        (
            'tls_cert = "server.key"\ntls_key = "server.key"',
            r"at server\.tls_cert: cannot load the certificate and key as PEM",
        ),
    ],
)
def test_tls_config_errors_are_one_sentence(
    tmp_path: Path, ca: TestCA, cert: ServerCert, server: str, error: str
) -> None:
    ca.issue("other")
    key = serialization.load_pem_private_key(cert.key_file.read_bytes(), None)
    (tmp_path / "encrypted.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    with pytest.raises(ConfigError, match=error) as raised:
        load_config(write_config(tmp_path, server))
    assert "\n" not in str(raised.value)
