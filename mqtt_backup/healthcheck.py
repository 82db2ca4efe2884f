"""`python -m mqtt_backup.healthcheck`: exit 0 when the bridge's /healthz says 200, 1 otherwise.

For a container's HEALTHCHECK (the image has no curl): it finds the metrics address the way the
bridge does (MQTT_BACKUP_METRICS_BIND / _PORT, the config file) and asks on the loopback when the
bridge listens on every address.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

from mqtt_backup import config
from mqtt_backup.errors import BackupError

# A bridge bound to every address answers on the loopback too.
WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - names them, binds nothing


def main() -> int:
    """Print the one-line reason; 0 healthy, 1 not (or no metrics server configured)."""
    try:
        where = config.load({}, os.environ).metrics_address
    except BackupError as exc:
        sys.stderr.write(f"healthcheck: {exc.message()}\n")
        return 1
    if where is None:
        sys.stderr.write("healthcheck: no metrics server: set MQTT_BACKUP_METRICS_BIND\n")
        return 1
    host = WILDCARDS.get(where[0], where[0])
    url = f"http://{f'[{host}]' if ':' in host else host}:{where[1]}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            sys.stdout.write(response.read().decode())
            return 0
    except urllib.error.HTTPError as exc:
        sys.stdout.write(exc.read().decode())
    except OSError as exc:
        sys.stdout.write(f"cannot reach {url}: {exc}\n")
    return 1


if __name__ == "__main__":
    sys.exit(main())
