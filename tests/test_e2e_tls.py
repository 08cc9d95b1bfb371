"""End to end: TLS served directly on the listen port (wss:// and https://).

A test CA and server certificate are made per test with `cryptography`; phoenix.js in
Node trusts the CA through the driver's `caFile` option, Python clients through an
ssl context.
"""

from __future__ import annotations

import http.client
import signal
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from support.broker import BrokerProcess
from support.certs import ServerCert, TestCA
from support.node_client import NodeClient

TIMEOUT = 5


def tls_config(cert: ServerCert, **server: Any) -> dict[str, Any]:
    return {
        "server": {
            "tls_cert": str(cert.cert_file),
            "tls_key": str(cert.key_file),
            "handshake_timeout": 1,
            **server,
        },
        "auth": {"tokens": [{"user": "alice", "token": "alice-token"}]},
        "topics": [{"pattern": "room:*", "echo": ["ping"]}],
    }


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


def https_get(broker: BrokerProcess, ca: TestCA, path: str) -> tuple[int, bytes, int]:
    """(status, body, serial number of the certificate the server presented)."""
    context = ssl.create_default_context(cafile=str(ca.ca_file))
    conn = http.client.HTTPSConnection(broker.host, broker.port, context=context, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        der = conn.sock.getpeercert(binary_form=True)
        response = conn.getresponse()
        return response.status, response.read(), x509.load_der_x509_certificate(der).serial_number
    finally:
        conn.close()


def open_wss_client(
    broker: BrokerProcess, ca: TestCA, factory: Callable[..., NodeClient], name: str
) -> NodeClient:
    client = factory(name)
    client.connect(broker.socket_url(), {}, authToken="alice-token", caFile=str(ca.ca_file))
    client.expect_open()
    assert client.join("room:tls")["status"] == "ok"
    return client


def test_phoenix_js_and_https_share_the_tls_port(
    broker_factory: Callable[..., BrokerProcess],
    node_client_factory: Callable[..., NodeClient],
    ca: TestCA,
) -> None:
    cert = ca.issue("server")
    broker = broker_factory(tls_config(cert))
    assert broker.url.startswith("https://")  # it logged "listening on https://..."

    alice = open_wss_client(broker, ca, node_client_factory, "alice")
    reply = alice.call("room:tls", "ping", {"big": "x" * 200_000})
    assert reply["response"] == {"big": "x" * 200_000}

    status, body, serial = https_get(broker, ca, "/socket/websocket?token=alice-token")
    # A good token but no upgrade headers: the front door says so, over HTTPS.
    assert (status, serial) == (400, cert.serial)
    assert b"upgrade" in body

    # Shutting down closes the TLS websocket cleanly too, with the code that sends
    # phoenix.js elsewhere.
    assert broker.stop() == 0
    assert alice.expect({"type": "close"})["code"] == 1001


def test_a_client_not_speaking_tls_is_closed_with_one_log_line(
    broker_factory: Callable[..., BrokerProcess],
    node_client_factory: Callable[..., NodeClient],
    ca: TestCA,
) -> None:
    broker = broker_factory(tls_config(ca.issue("server")))
    alice = open_wss_client(broker, ca, node_client_factory, "alice")

    mark = broker.mark()
    with socket.create_connection((broker.host, broker.port), timeout=TIMEOUT) as plain:
        plain.sendall(b"GET /socket/websocket HTTP/1.1\r\nhost: x\r\n\r\n")
        assert plain.recv(4096) == b""  # closed, nothing said in clear text
    broker.wait_for_log(r"closing 127\.0\.0\.1:\d+: it sent plain HTTP to the TLS port", since=mark)

    mark = broker.mark()
    with socket.create_connection((broker.host, broker.port), timeout=TIMEOUT) as silent:
        assert silent.recv(4096) == b""  # after handshake_timeout
    broker.wait_for_log(r"closing .*: no complete TLS handshake within 1 s", since=mark)

    assert alice.call("room:tls", "ping", {"n": 1})["response"] == {"n": 1}
    assert alice.seen({"type": "close"}) == []
    assert sum("closing 127.0.0.1" in line for line in broker.lines) == 2


def test_reload_serves_the_new_certificate_to_new_connections(
    broker_factory: Callable[..., BrokerProcess],
    node_client_factory: Callable[..., NodeClient],
    ca: TestCA,
) -> None:
    first = ca.issue("server")
    broker = broker_factory(tls_config(first))
    alice = open_wss_client(broker, ca, node_client_factory, "alice")
    assert https_get(broker, ca, "/")[2] == first.serial

    second = ca.issue("server")  # same file names: the files are replaced
    assert second.serial != first.serial
    mark = broker.mark()
    broker.send_signal(signal.SIGHUP)
    broker.wait_for_log("reloaded config", since=mark)

    assert https_get(broker, ca, "/")[2] == second.serial
    assert alice.call("room:tls", "ping", {"n": 1})["response"] == {"n": 1}
    bob = open_wss_client(broker, ca, node_client_factory, "bob")
    assert bob.call("room:tls", "ping", {"n": 2})["response"] == {"n": 2}


def test_a_reload_with_a_broken_key_keeps_serving_the_old_certificate(
    broker_factory: Callable[..., BrokerProcess], ca: TestCA
) -> None:
    cert = ca.issue("server")
    broker = broker_factory(tls_config(cert))
    cert.key_file.write_text("not a key\n")

    mark = broker.mark()
    broker.send_signal(signal.SIGHUP)
    line = broker.wait_for_log(r"reload refused, keeping the running config: .*tls_", since=mark)

    assert "not a key" not in line.string
    assert https_get(broker, ca, "/")[2] == cert.serial
