"""Stopping the bridge from signal handlers: a second signal may run inside the first's handler."""

from __future__ import annotations

import threading
from pathlib import Path

from mqtt_backup import config
from mqtt_backup.bridge import Bridge


def test_a_stop_nested_in_another_stops_event_set_returns(data_dir: Path) -> None:
    # Found by a new user: Ctrl-C in `make run` sends the terminal's SIGINT to the bridge and,
    # from the script's trap, a SIGTERM right after. Python runs a handler between two bytecodes,
    # so the second one ran inside the first's `Event.set`, which holds the event's lock: the
    # nested set waited for it forever and `make run` hung (seen with gdb: two `stop` frames).
    bridge = Bridge(config.load({"data": data_dir, "partitions": 1}, {}))
    try:
        condition = bridge._stop._cond  # type: ignore[attr-defined]  # threading internals
        notify_all = condition.notify_all

        def second_signal_arrives_here() -> None:
            bridge.stop()  # what the SIGTERM handler does, inside the lock the SIGINT one holds
            notify_all()

        condition.notify_all = second_signal_arrives_here
        first = threading.Thread(target=bridge.stop, name="first-signal", daemon=True)
        first.start()
        first.join(timeout=10)
        assert not first.is_alive(), "the nested stop waited forever for the event's lock"
        assert bridge._stop.is_set()
    finally:
        bridge.store.close()
