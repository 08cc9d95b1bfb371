"""Fixtures for end-to-end tests: real `phxbroker serve` processes and phoenix.js clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import support.fuzz  # noqa: F401  (registers the hypothesis profiles, see `make fuzz`)
from support.broker import BrokerProcess
from support.node_client import NodeClient, check_node_installed

BROKERS = pytest.StashKey[list[BrokerProcess]]()
CLIENTS = pytest.StashKey[list[NodeClient]]()
TRACEBACK = "Traceback (most recent call last)"

BrokerFactory = Callable[..., BrokerProcess]
NodeClientFactory = Callable[..., NodeClient]


@pytest.fixture
def broker_factory(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BrokerFactory]:
    """Start brokers: `broker_factory(config, args=(), env=None, command=None)` returns a
    started BrokerProcess (`command` replaces `python -m phxbroker serve --config {config}`).

    At teardown every broker still running is stopped with SIGTERM; one that does not
    exit 0, or that logged a Python traceback, fails the test.
    """
    brokers: list[BrokerProcess] = []
    request.node.stash[BROKERS] = brokers

    def start(
        config: str | Mapping[str, Any],
        *,
        args: tuple[str, ...] = (),
        env: Mapping[str, str] | None = None,
        command: Sequence[str] | None = None,
        timeout: float = 10,
    ) -> BrokerProcess:
        workdir = tmp_path / f"broker{len(brokers)}"
        workdir.mkdir()
        broker = BrokerProcess(config, workdir, args=args, env=env, command=command)
        brokers.append(broker)
        return broker.start(timeout=timeout)

    yield start

    problems = []
    for broker in brokers:
        if broker.returncode is None:
            code = broker.stop()
            if code != 0:
                problems.append(f"phxbroker on port {broker.port} exited {code} on SIGTERM")
        broker.kill()
        if TRACEBACK in broker.log_text:
            problems.append(f"phxbroker on port {broker.port} logged a traceback")
    if problems:
        pytest.fail("; ".join(problems) + " (its log is in the report)", pytrace=False)


@pytest.fixture
def node_client_factory(request: pytest.FixtureRequest) -> Iterator[NodeClientFactory]:
    """Start phoenix.js clients: `node_client_factory(name="client", env=None)` returns a
    started NodeClient. All are closed at teardown. Fails (never skips) when Node or the
    npm packages are missing."""
    try:
        check_node_installed()
    except AssertionError as exc:
        pytest.fail(str(exc), pytrace=False)
    clients: list[NodeClient] = []
    request.node.stash[CLIENTS] = clients

    def start(name: str | None = None, env: Mapping[str, str] | None = None) -> NodeClient:
        client = NodeClient(name or f"client{len(clients) + 1}", env=env)
        clients.append(client)
        return client.start()

    yield start

    for client in clients:
        client.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On failure, show every broker's log and every client's recent events."""
    report = yield
    if report.failed:
        for broker in item.stash.get(BROKERS, []):
            report.sections.append((f"phxbroker :{broker.port} log", broker.log_text))
        for client in item.stash.get(CLIENTS, []):
            report.sections.append((f"phoenix.js {client.name}", client.diagnostics()))
    return report
