"""mqtt-backup: keep every message an MQTT broker delivers, durably, and give it back over MQTT."""

__version__ = "0.1.0"
