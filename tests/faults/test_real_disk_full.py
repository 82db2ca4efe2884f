"""A real full disk: the data directory on a small tmpfs in a private mount namespace.

RocksDB's own write, sync, open and WAL-replay paths meet a real ENOSPC here (the injected faults
of test_storage_faults.py stop at the store's interface). Needs root, like CI on this machine kind.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Broker, wait_until
from tests.faults.conftest import Report
from tests.faults.harness import (
    RATE,
    Publisher,
    ReadBack,
    assert_nothing_lost,
    bridge_process,
    cli,
    copies_of,
    fleet,
    restored,
    size,
    stored_total,
    tally,
)

pytestmark = [pytest.mark.slow, pytest.mark.serial]  # alone: see tests/test_disk_full.py
TMPFS_MB = 64  # the ballast is an 8th of it; the bridge wants 16 MiB free to start


@contextlib.contextmanager
def small_disk(mount: Path) -> Iterator[list[str]]:
    """A tmpfs of TMPFS_MB MiB on `mount`, seen only inside a private mount namespace.

    Yields the command prefix that runs a program inside it.
    """
    mount.mkdir(parents=True)
    holder = subprocess.Popen(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount -t tmpfs -o size={TMPFS_MB}m tmpfs {mount} && echo ready && exec sleep 3600",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert holder.stdout is not None
        first = holder.stdout.readline().strip()
        assert first == "ready", f"cannot mount a tmpfs in a mount namespace: {first}"
        yield ["nsenter", "-t", str(holder.pid), "-m", "--"]
    finally:
        holder.kill()
        holder.wait(10)


def _fill(prefix: list[str], target: Path) -> None:
    """Write zeros into `target` until the disk is full."""
    subprocess.run(
        [*prefix, "sh", "-c", f"cat /dev/zero > {target}"], capture_output=True, check=False
    )


def _free_bytes(prefix: list[str], mount: Path) -> int:
    done = subprocess.run(
        [*prefix, "df", "--output=avail", "-B1", str(mount)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.split()[-1])


def _exported(data: Path, prefix: list[str]) -> list[str]:
    done = cli("export", "--data", str(data), prefix=prefix)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _full_disk_episode(
    own_broker: Broker, tmp_path: Path, unique: str, free: str
) -> tuple[ReadBack, dict[str, object]]:
    """Fill the disk under a running bridge while devices publish, then free it by `free`."""
    mount = tmp_path / "disk"
    data = mount / "data"
    figures: dict[str, object] = {"tmpfs_mib": TMPFS_MB}
    with (
        small_disk(mount) as inside,
        bridge_process(own_broker.url, data, tmp_path / "bridge.log", prefix=inside) as bridge,
    ):
        bridge.start()
        old = f"{unique}-old"
        big = Publisher(own_broker.port, [old], limit=300, pad=64 * 1024)  # about 20 MB
        big.start().wait_done()
        wait_until(lambda: _count(data, inside, old) >= big.ledger.total, 60, "the old history")
        publisher = Publisher(own_broker.port, fleet(unique, 4), rate=RATE).start()
        publisher.wait_accepted(size(300, 2000))
        _fill(inside, mount / "filler")
        wait_until(lambda: "storage failed" in bridge.text(), 60, "the bridge to hit ENOSPC")
        publisher.wait_accepted(size(300, 2000))
        if free == "forget":
            freed = cli("forget", old, "--data", str(data), prefix=inside)
            figures["forget_exit"] = freed.returncode
            figures["forget_error"] = freed.stderr.strip()[:200]
            assert freed.returncode == 0, f"forget could not free the full disk: {freed.stderr}"
        else:
            subprocess.run([*inside, "rm", str(mount / "filler")], check=True)
        figures["free_bytes_after"] = _free_bytes(inside, mount)
        wait_until(lambda: "writable again" in bridge.text(), 120, "the bridge to resume")
        publisher.wait_accepted(size(300, 2000))
        ledger = publisher.stop()
        wait_until(
            lambda: _count_all(data, inside, list(ledger.accepted)) >= ledger.total, 120, "all"
        )
        got = restored(own_broker.url, list(ledger.accepted))
        back = ReadBack(
            tally(ledger, copies_of(_exported(data, inside))), tally(ledger, got.copies), got
        )
        figures["log_tracebacks"] = bridge.text().count("Traceback")
    return back, figures


def _count(data: Path, prefix: list[str], device: str) -> int:
    return _count_all(data, prefix, [device])


def _count_all(data: Path, prefix: list[str], devices: list[str]) -> int:
    """Messages of `devices` stored on the small disk (0 before the store is there).

    Read in this process through the namespace holder's view of the filesystem (the `nsenter`
    prefix names its pid): a CLI process per poll cost a second or two of CPU, taken from the
    bridge under test.
    """
    seen = Path(f"/proc/{prefix[prefix.index('-t') + 1]}/root") / data.relative_to("/")
    return stored_total(seen, devices)


def test_real_disk_full_freed_by_removing_a_file(
    own_broker: Broker, tmp_path: Path, unique: str, report: Report
) -> None:
    """Real disk full (tmpfs, ENOSPC in RocksDB), then another file removed"""
    back, figures = _full_disk_episode(own_broker, tmp_path, unique, "rm")
    report(export=back.export, restore=back.restore, **figures)
    assert_nothing_lost(back)


def test_real_disk_full_freed_by_the_tool(
    own_broker: Broker, tmp_path: Path, unique: str, report: Report
) -> None:
    """Real disk full (tmpfs, ENOSPC in RocksDB), freed with `mqtt-backup forget`"""
    back, figures = _full_disk_episode(own_broker, tmp_path, unique, "forget")
    report(export=back.export, restore=back.restore, **figures)
    assert_nothing_lost(back)
