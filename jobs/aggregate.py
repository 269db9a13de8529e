"""Ray job entrypoint for the aggregation job.

    ray job submit --working-dir . -- python jobs/aggregate.py STORE [--out DIR] [--workers N]
        [--threads T] [--no-maps] [--partial]

Joins the cluster the job was submitted to (``ray job submit`` sets RAY_ADDRESS) and runs the same
code as ``distributed-attr aggregate`` (``distributed_attr.aggregate.run_aggregation``): reader
tasks open the store themselves, so its path must be reachable from every node (a shared file
system). Prints the summary as JSON.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed_attr.cli import main as cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    argv = ["aggregate", *(sys.argv[1:] if argv is None else argv)]
    if "--json" not in argv:
        argv.append("--json")
    if "--address" not in argv and os.environ.get("RAY_ADDRESS"):
        argv += ["--address", "auto"]
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
