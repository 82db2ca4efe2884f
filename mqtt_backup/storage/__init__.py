"""The partitioned store: the only package that imports rocksdict.

`Store` is the writer (one per data directory, locked); `StoreReader` opens the same partitions
read-only beside a running writer. Both speak in `records.Record`s and device ids.
"""

from mqtt_backup.storage.store import DeviceInfo, Pending, Store, StoredMessage, StoreReader

__all__ = ["DeviceInfo", "Pending", "Store", "StoreReader", "StoredMessage"]
