"""What the connect and join lines cost per event, on one core.

    .venv/bin/python bench/activity_cost.py

Runs the activity log (phxbroker/broker/activity.py) through the daemon's real log
handler, formatter and redaction (text format, written to /dev/null) in its three regimes:
a line written, a line left out because the second's budget is spent (a connect storm),
and lines switched off (`[log] connections = false`). Prints microseconds per call, the
median of five runs.
"""

from __future__ import annotations

import logging
import statistics
import time

from phxbroker.broker.activity import ActivityLog
from phxbroker.config.settings import LogConfig
from phxbroker.ops import logs
from phxbroker.protocol.serializers import V2

PARAMS = {"token": "SFMyNTY.g2gDYQFuBgBXo1XljgFiAAFRgA.mHfSy-k7PmiX", "vsn": "2.0.0"}


class Peer:
    transport = "websocket"
    id = 12345
    user = "alice"
    remote = "10.0.0.7:51000"
    serializer = V2


def per_call(activity: ActivityLog, calls: int, what: str) -> float:
    peer = Peer()
    runs = []
    for _ in range(5):
        started = time.perf_counter()
        if what == "connect":
            for _ in range(calls):
                activity.connected(peer, "/socket/websocket", PARAMS, started)
        else:
            for _ in range(calls):
                activity.joined(peer, "room:lobby", {}, started)
        runs.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(runs)


def main() -> None:
    with open("/dev/null", "w") as sink:
        logs.setup(LogConfig(), secret_params=["token"], stream=sink)
        never_over = ActivityLog(lines_per_second=10**12)
        spent = ActivityLog(lines_per_second=0)
        print("µs per call            connect   join")
        for label, activity, calls in (
            ("line written", never_over, 20_000),
            ("over the budget", spent, 500_000),
        ):
            connect, join = per_call(activity, calls, "connect"), per_call(activity, calls, "join")
            print(f"{label:<22} {connect:7.2f} {join:6.2f}")
        logs.setup(LogConfig(connections=False), stream=sink)
        off = ActivityLog()
        connect, join = per_call(off, 500_000, "connect"), per_call(off, 500_000, "join")
        print(f"{'switched off':<22} {connect:7.2f} {join:6.2f}")
        logging.shutdown()


if __name__ == "__main__":
    main()
