"""``distributed-attr``: run, inspect, aggregate, report, demo, methods."""
from __future__ import annotations

import argparse
import errno
import json
import os
import sys

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def _cmd_run(args: argparse.Namespace) -> int:
    from .runner import run

    summary = run(args.config, address=args.address, resume=args.resume, overwrite=args.overwrite,
                  progress=not args.quiet)
    print(summary)
    if summary.interrupted:
        print("interrupted: committed units are kept; rerun with --resume to finish", file=sys.stderr)
        return 130
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import describe_store

    info = describe_store(args.store, verify=True) if args.verify else describe_store(args.store)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        from .inspect import format_description

        print(format_description(info))
    if args.verify:
        invalid = info.get("invalid_units")
        if invalid:
            shown = list(invalid)[:20]
            more = f" (and {len(invalid) - 20} more)" if len(invalid) > 20 else ""
            print(f"verify: {len(invalid)} unit(s) failed verification: {shown}{more}", file=sys.stderr)
            return 1
    return 0


def _cmd_aggregate(args: argparse.Namespace) -> int:
    from .aggregate import run_aggregation

    result = run_aggregation(args.store, address=args.address, num_workers=args.workers, out_dir=args.out,
                             threads=args.threads, read_maps=not args.no_maps, class_maps=args.class_maps,
                             partial=args.partial)
    if not args.json:
        _print_partial(result, "aggregated")
    print(json.dumps(result, indent=2, default=str) if args.json else _short(result))
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import run_evaluation

    result = run_evaluation(args.store, out_dir=args.out, partial=args.partial)
    _print_partial(result, "evaluated")
    print(_short(result))
    return 0


def _print_partial(result: dict, verb: str) -> None:
    """The summary's first line, for outputs of a store that was not complete (``--partial``)."""
    if result.get("partial"):
        print(f"partial: {verb} {result['units_done']} of {result['n_units']} units (--partial); every output "
              "is marked partial")


def _cmd_report(args: argparse.Namespace) -> int:
    from .io.derived import warning_line
    from .report import output_states, write_report

    # found once: the first line printed and the page's banner say the same
    statuses = output_states(args.store, out_dir=args.out, companions=args.companions)
    path = write_report(args.store, out_dir=args.out, companions=args.companions, statuses=statuses)
    warning = warning_line(statuses)
    if warning:
        print(warning)
    print(f"report: {path}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, images=args.images, workers=args.workers, quick=args.quick)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark.build import build

    try:
        build(args.out, size=args.size, seed=args.seed, images=args.images)
    except ValueError as exc:  # size or image count out of range
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_benchmark_run(args: argparse.Namespace) -> int:
    from .benchmark.run import run_benchmark

    if args.images < 8:
        print("error: --images must be >= 8 (a quarter of them choose the cutoffs, the rest test it)", file=sys.stderr)
        return 2
    run_benchmark(args.data, args.out, images=args.images, workers=args.workers, quick=args.quick)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import list_methods

    for name, info in list_methods().items():
        params = ", ".join(f"{k}={v!r}" for k, v in info["params"].items()) or "-"
        print(f"{name:22s} {info['family']:12s} {params}")
    return 0


def _short(result: object) -> str:
    if isinstance(result, dict):
        return "\n".join(f"{k}: {v}" for k, v in result.items())
    return str(result)


#: ``aggregate --partial`` and ``evaluate --partial``
PARTIAL_HELP = ("use a store that is not complete (or that a job is still writing): the units done so far; "
                "recorded and shown in every output. Without it such a store is refused")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distributed-attr", description=__doc__)
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of user errors (bad config, data, model or store)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run an attribution job described by a YAML config")
    r.add_argument("config")
    r.add_argument("--address", default=None, help="Ray cluster address ('auto' joins the running cluster)")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="finish an existing store made with the same config")
    g.add_argument("--overwrite", action="store_true", help="replace an existing store")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=_cmd_run)

    i = sub.add_parser("inspect", help="what a store holds, how far its job got, which images failed")
    i.add_argument("store")
    i.add_argument("--json", action="store_true")
    i.add_argument("--verify", action="store_true",
                   help="also check the committed units' data; exit 1 if any unit is invalid")
    i.set_defaults(func=_cmd_inspect)

    a = sub.add_parser("aggregate", help="dataset-wide spectra and filter statistics over a store")
    a.add_argument("store", help="path of the Zarr store written by the attribution job")
    a.add_argument("--address", default=None, help="Ray cluster to join ('auto' under ray job submit)")
    a.add_argument("--workers", type=int, default=None,
                   help="reader tasks in flight (default: the cluster's CPUs / --threads; 0: no Ray)")
    a.add_argument("--threads", type=int, default=None,
                   help="threads (and Ray CPUs) per reader task (default 2: read ahead while reducing)")
    a.add_argument("--no-maps", action="store_true",
                   help="skip the mean/std maps: read only the small spectral arrays")
    a.add_argument("--class-maps", type=int, default=100,
                   help="mean/std maps per class only up to this many classes (default 100)")
    a.add_argument("--out", default=None, help="folder for tables and plots (default: <store>-outputs)")
    a.add_argument("--partial", action="store_true", help=PARTIAL_HELP)
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=_cmd_aggregate)

    e = sub.add_parser("evaluate", help="metric tables, best cutoffs, rankings over a store")
    e.add_argument("store")
    e.add_argument("--out", default=None)
    e.add_argument("--partial", action="store_true", help=PARTIAL_HELP)
    e.set_defaults(func=_cmd_evaluate)

    rp = sub.add_parser("report", help="write the HTML and Markdown report of a store")
    rp.add_argument("store")
    rp.add_argument("--out", default=None)
    rp.add_argument("--with", dest="companions", action="append", default=[], metavar="STORE",
                    help="another store of the same data (e.g. another model) shown as its own section; repeatable")
    rp.set_defaults(func=_cmd_report)

    d = sub.add_parser("demo", help="the whole pipeline on bundled digits, offline, on the CPU")
    d.add_argument("--out", default="demo-output")
    d.add_argument("--images", type=int, default=192)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--quick", action="store_true", help="fewer methods and steps (for a smoke test)")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("benchmark", help="a generated dataset where the right attribution is known (docs/benchmark.md)")
    bsub = b.add_subparsers(dest="benchmark_command", required=True)
    bb = bsub.add_parser("build", help="write the dataset (Parquet, with ground-truth masks) and train or reuse its two models")
    bb.add_argument("--out", default="benchmark-data", help="folder for the dataset, the models and an example job")
    bb.add_argument("--size", type=int, default=128, help="image side in pixels, 64-224 (default 128)")
    bb.add_argument("--seed", type=int, default=0)
    bb.add_argument("--images", type=int, default=6000, help="images in all: 70%% train, 10%% validation, 20%% test")
    bb.set_defaults(func=_cmd_benchmark)
    br = bsub.add_parser("run", help="both models' jobs, evaluation and the FORGrad answer with confidence intervals")
    br.add_argument("--data", default="benchmark-data", help="the folder 'benchmark build' wrote")
    br.add_argument("--out", default="benchmark-run", help="folder for the two stores, their outputs and answer.md")
    br.add_argument("--images", type=int, default=240, help="test images per model (default 240, 40%% of them also in the robustness job; the split has 1,200)")
    br.add_argument("--workers", type=int, default=2, help="Ray workers (0: in this process)")
    br.add_argument("--quick", action="store_true", help="3 methods, 2 cutoffs (the control and 15), fewer steps and samples (a smoke test)")
    br.set_defaults(func=_cmd_benchmark_run)

    m = sub.add_parser("methods", help="list the registered attribution methods and their parameters")
    m.set_defaults(func=_cmd_methods)
    return p


#: OSErrors that mean the user named a wrong path, not a bug of ours.
_PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


#: OSErrors that mean the disk or folder cannot take what we write (full, read-only, over quota):
#: the user's machine, not a bug of ours, whichever of our writes met it
_DISK_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM}


def _disk_message(exc: OSError) -> str:
    """One line for a write the disk refused: what it said, the file, and what to do."""
    what = exc.strerror or os.strerror(exc.errno or 0)
    where = f": {str(exc.filename)!r}" if exc.filename is not None else ""
    todo = {errno.ENOSPC: "free some space or write elsewhere (another --out or store path), then run the command "
                          "again (run: with --resume)",
            errno.EDQUOT: "free some of your quota or write elsewhere, then run the command again",
            errno.EROFS: "choose a writable folder (--out, or the store path)"}.get(exc.errno, "")
    return f"{what}{where}" + (f"; {todo}" if todo else "")


def _user_message(exc: BaseException) -> str:
    """The error as one line: ``strerror: 'path'`` for path errors, newlines folded otherwise."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        msg = f"{exc.strerror}: {str(exc.filename)!r}"
    else:
        msg = str(exc) or type(exc).__name__
    if "\n" in msg or "\r" in msg:
        msg = " ".join(line.strip() for line in msg.splitlines() if line.strip())
    return msg


#: arguments that name local paths: ``~`` in them is the home folder even where the shell left it
#: as it is (quoted, or after ``=`` as in ``--out=~/x``)
_PATH_ARGS = ("config", "store", "out", "data", "companions")


def _expand_paths(args: argparse.Namespace) -> None:
    from .config import home_expanded

    for name in _PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, list):
            setattr(args, name, [home_expanded(v) for v in value])
        elif isinstance(value, str):
            setattr(args, name, home_expanded(value))


def main(argv: list[str] | None = None) -> int:
    """Run one command. A user error (bad config, data, model, store or path) prints one
    ``error: ...`` line on stderr and returns 2; ``--debug`` re-raises it with its traceback.
    Any other exception is a bug and propagates with its traceback."""
    from .config import ConfigError
    from .io.lease import LeaseError
    from .io.models import ModelError
    from .io.sources import SourceError
    from .io.store import StoreError
    from .runner import JobError

    user_errors = (ConfigError, SourceError, ModelError, StoreError, JobError, LeaseError, *_PATH_ERRORS)
    args = build_parser().parse_args(argv)
    _expand_paths(args)
    try:
        return int(args.func(args) or 0)
    except user_errors as exc:
        if args.debug:
            raise
        print(f"error: {_user_message(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if args.debug or exc.errno not in _DISK_ERRNOS:
            raise
        print(f"error: {_user_message(RuntimeError(_disk_message(exc)))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
