"""Ray job entrypoint for the attribution job.

    ray job submit --working-dir . -- python jobs/attribute.py CONFIG.yaml [--resume | --overwrite]

Joins the cluster the job was submitted to (``ray job submit`` sets RAY_ADDRESS) and runs the same
code as ``distributed-attr run``. The store path in the config must be reachable from every node
(a shared file system).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_attr.cli import main  # noqa: E402

if __name__ == "__main__":
    argv = ["run", *sys.argv[1:]]
    if "--address" not in argv and os.environ.get("RAY_ADDRESS"):
        argv += ["--address", "auto"]
    sys.exit(main(argv))
