"""The `mqtt-backup` command line: the only package that prints or exits.

- `main.py`: the command group, `--version`, and the one mapping of errors to exit codes.
- `types.py`: click parameter types (times, durations, topic filters, device ids, rates).
- `options.py`: options several commands share; loading the settings.
- `output.py`: JSON, tables, lines, progress (the one Console).
- `run.py` (its flags are config.py's settings), `read.py` (devices, export, stats, verify),
  `restore.py`, `maintenance.py` (snapshot, prune, forget, partitions), `simulate.py`.
"""

from mqtt_backup.cli.main import app, main

__all__ = ["app", "main"]
