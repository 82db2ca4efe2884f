"""`make bench`: the bridge measured beside the broker's own ceiling, on this machine, in one run.

Rooms: `wire` (a raw MQTT 5 client for load and measurement), `procs` (broker, bridge and
mosquitto_sub processes and their meters), `data` (payloads and the direct prefill), `measure`
(pure arithmetic), `scenarios`, `machine`, `report` (table, JSON, docs/benchmarks.md).
"""
