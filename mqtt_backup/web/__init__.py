"""The read-only browser view of a data directory: the only importer of starlette, uvicorn, jinja2.

`create_app(data_dir, token=None)` is the ASGI app; `run_web(data, bind, token_file)` is the
`mqtt-backup web` command's work (checks, token, serving).
"""

from mqtt_backup.web.app import create_app
from mqtt_backup.web.serve import run_web

__all__ = ["create_app", "run_web"]
