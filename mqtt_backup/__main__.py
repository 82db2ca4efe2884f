"""`python -m mqtt_backup` is the same as the `mqtt-backup` console script."""

from mqtt_backup.cli import main

main()
