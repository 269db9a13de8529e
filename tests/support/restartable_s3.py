"""An S3 server on loopback that can be stopped and started again on the same port with its content.

moto's server keeps its buckets in memory, so a plain restart would come back empty. This runs
moto's own server with moto's request recorder on: every request is appended to the file named by
``MOTO_RECORDER_FILEPATH`` as it arrives. At start, before the port is bound (so no client can see
a half-restored server), an existing recording is replayed into the new server in-process through
werkzeug's test client, which rebuilds the same buckets and objects (ETags are content hashes, so
they come back equal). Killing the process and running this again on the same port is a real
outage: connections are refused until the new process listens.

    python restartable_s3.py HOST PORT      (MOTO_RECORDER_FILEPATH must be set)
"""
from __future__ import annotations

import base64
import json
import os
import sys
from urllib.parse import urlsplit


def replay(app, path: str) -> int:
    from werkzeug.test import Client

    client = Client(app)
    count = 0
    with open(path) as fh:
        lines = fh.readlines()
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut short by the kill: its request was never answered either
        body = entry.get("body") or b""
        if entry.get("body_encoded"):
            body = base64.b64decode(body)
        url = urlsplit(entry["url"])
        headers = {k: v for k, v in (entry.get("headers") or {}).items()
                   if k.lower() not in ("transfer-encoding", "content-length")}
        host = headers.get("Host") or headers.get("host") or url.netloc or "127.0.0.1"
        client.open(url.path or "/", method=entry["method"], query_string=url.query, headers=headers, data=body,
                    base_url=f"http://{host}")
        count += 1
    return count


def main(host: str, port: int) -> None:
    path = os.environ["MOTO_RECORDER_FILEPATH"]
    os.environ.setdefault("MOTO_PORT", str(port))
    from moto.moto_api import recorder
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    app = DomainDispatcherApplication(create_backend_app)
    recorder.stop_recording()
    if os.path.exists(path):
        replay(app, path)
    recorder.start_recording()
    run_simple(host, port, app, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
