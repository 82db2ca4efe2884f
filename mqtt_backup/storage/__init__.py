"""The partitioned store: the only package that imports rocksdict.

`Store` is the writer (one per data directory, locked); `StoreReader` opens the same partitions
read-only beside a running writer. Both speak in `records.Record`s and device ids.

Maintenance is here too, each returning a typed result with `as_json()`: `maintenance`
(snapshot, prune, forget) and `moves` (partitions add/remove/rebalance) take the writer;
`checks` (verify, stats) opens the partitions read-only.
"""

from mqtt_backup.storage.store import (
    Cursor,
    DeviceInfo,
    LiveReader,
    Pending,
    Store,
    StoredMessage,
    StoreReader,
)

__all__ = ["Cursor", "DeviceInfo", "LiveReader", "Pending", "Store", "StoreReader", "StoredMessage"]
