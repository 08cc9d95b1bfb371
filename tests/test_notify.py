"""The sd_notify client: datagrams to a path or abstract socket, watchdog settings."""

from __future__ import annotations

import os

import pytest
import trio
from support.notify_socket import NotifySocket

from phxbroker.ops.notify import Notifier, keep_informed, watchdog_interval


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_messages_reach_the_socket_named_by_notify_socket(abstract: bool) -> None:
    with NotifySocket(abstract=abstract) as systemd:
        notifier = Notifier.from_environ(systemd.env())
        assert notifier.enabled
        notifier.ready("serving 0 connections")
        notifier.reloading()
        notifier.stopping("draining: 2 connections\nleft")
        _, ready = systemd.wait_for({"READY": "1"})
        assert ready["STATUS"] == "serving 0 connections"
        _, reloading = systemd.wait_for({"RELOADING": "1"})
        assert int(reloading["MONOTONIC_USEC"]) > 0
        _, stopping = systemd.wait_for({"STOPPING": "1"})
        assert stopping["STATUS"] == "draining: 2 connections left"  # one line, always
        notifier.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False


def test_an_unreachable_socket_is_reported_once_and_never_raises(
    tmp_path: os.PathLike[str], caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(f"{tmp_path}/nobody-listens")
    with caplog.at_level("DEBUG", logger="phxbroker.notify"):
        assert notifier.send("READY=1") is False
        assert notifier.send("WATCHDOG=1") is False
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot notify systemd" in warnings[0].getMessage()


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}) == 0.1
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({}) is None


async def test_the_reporter_pings_and_sends_status_only_when_it_changes() -> None:
    with NotifySocket() as systemd:
        notifier = Notifier(systemd.address)
        status = ["serving 0 connections"]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: keep_informed(notifier, lambda: status[0], watchdog=0.01))
            await trio.to_thread.run_sync(systemd.wait_for, {"STATUS": "serving 0 connections"})
            mark = systemd.mark()
            await trio.to_thread.run_sync(lambda: systemd.wait_for({"WATCHDOG": "1"}, since=mark))
            status[0] = "serving 1 connection"
            await trio.to_thread.run_sync(systemd.wait_for, {"STATUS": "serving 1 connection"})
            nursery.cancel_scope.cancel()
        statuses = [m["STATUS"] for m in systemd.messages if "STATUS" in m]
        assert statuses == ["serving 0 connections", "serving 1 connection"]
        notifier.close()


async def test_a_stuck_event_loop_stops_the_watchdog_pings() -> None:
    with NotifySocket() as systemd:
        notifier = Notifier(systemd.address)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: keep_informed(notifier, lambda: "x", watchdog=0.01))
            await trio.to_thread.run_sync(systemd.wait_for, {"WATCHDOG": "1"})
            # Block the loop itself, as a runaway computation would, and watch the socket
            # from this thread: once datagrams already sent are in, no ping may arrive.
            never = lambda message: False  # noqa: E731
            with pytest.raises(AssertionError):
                systemd.wait_for(never, timeout=0.1)  # lets pings already sent come in
            mark = systemd.mark()
            with pytest.raises(AssertionError):
                systemd.wait_for(never, timeout=0.3)
            assert systemd.mark() == mark, "pinged while the event loop was stuck"
            nursery.cancel_scope.cancel()
        notifier.close()
