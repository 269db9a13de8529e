"""Paths and URLs: a local path, ``file://``, or an object store (``s3://``, ``gs://``, ``az://``,
``abfs://``) wherever the job takes a location (``data.path``, ``store``, model ``weights``, every
CLI command).

Object stores go through ``obstore`` (Rust, one package for the three clouds, no botocore pins):
zarr's ``ObjectStore`` for the attribution store, obstore's conditional writes for the store's
lease, and obstore's fsspec adapter for the data sources. Credentials and endpoints come from each
cloud's standard environment (``AWS_*`` including ``AWS_ENDPOINT_URL`` and ``AWS_ALLOW_HTTP``,
``GOOGLE_*``, ``AZURE_*``) and, optionally, a ``storage_options`` mapping (obstore's
configuration keys, e.g. ``aws_region``; ``client_options`` for HTTP settings such as
``allow_http``). Secrets are never written to a store or a log: ``redact`` is applied to every
``storage_options`` that is recorded.

Transient faults (a refused connection, a timeout, a 5xx answer) are retried with exponential
backoff over a window of ``retry_window()`` seconds (``run.storage_retry_seconds``, default 60;
``set_retry_window`` sets it for the stores opened afterwards in this process): obstore's own
``retry_config`` for every request, and ``call_with_retries`` for the few operations retried as a
whole (the driver's commits). ``is_transient`` tells such a fault from a refusal that no retry
changes (credentials, a missing bucket).

Never pass a URL through ``pathlib.Path``: ``Path("s3://b/x")`` silently becomes ``s3:/b/x``.
"""
from __future__ import annotations

import os
import posixpath
import re
import time
from datetime import timedelta
from typing import Any, Callable, TypeVar

T = TypeVar("T")

#: URL scheme -> the optional extra that brings its support
SCHEMES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
           "azure": "azure"}
#: what obstore's fsspec adapter calls each scheme
_FSSPEC_PROTOCOL = {"s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "abfs", "abfss": "abfs",
                    "azure": "az"}
_SECRET_WORDS = ("secret", "key", "token", "password", "sas", "credential", "session")


#: seconds a request to object storage is retried before it fails (``run.storage_retry_seconds``)
DEFAULT_RETRY_SECONDS = 60.0
_retry_seconds = DEFAULT_RETRY_SECONDS
#: client settings that obstore reads from the environment but drops once ``client_options`` are
#: given (per extra: key -> variable): carried over, so that setting a timeout keeps ``AWS_ALLOW_HTTP``
_CLIENT_FROM_ENV = {"s3": {"allow_http": "AWS_ALLOW_HTTP"}, "azure": {"allow_http": "AZURE_ALLOW_HTTP"}}


class StorageError(ValueError):
    """A location cannot be used: unknown scheme, missing optional package, unreachable bucket,
    refused credentials. The message says which, and what to install or set."""


def scheme(location: str) -> str:
    """``"s3"``, ``"gs"``, ... for a URL; ``""`` for a local path (or a ``file://`` URL)."""
    head, sep, _ = str(location).partition("://")
    if not sep or head == "file":
        return ""
    return head.lower()


def is_remote(location: str | None) -> bool:
    return bool(location) and scheme(str(location)) != ""


def local_path(location: str) -> str:
    """The file-system path of a local location (``file:///x`` -> ``/x``)."""
    location = str(location)
    return location[len("file://"):] if location.startswith("file://") else location


def check_location(location: str, what: str) -> None:
    """Raise ``StorageError`` now (before any work) for an unknown scheme or a missing package."""
    s = scheme(location)
    if not s:
        return
    if s not in SCHEMES:
        raise StorageError(f"{what} {location!r}: unknown URL scheme {s + '://'!r}; known: file://, "
                           + ", ".join(f"{k}://" for k in SCHEMES))
    _require_obstore(location, what)


def _require_obstore(location: str, what: str) -> Any:
    try:
        import obstore
    except ImportError:
        extra = SCHEMES.get(scheme(location), "s3")
        raise StorageError(f"{what} {location!r} is on object storage, which needs an optional package: "
                           f"pip install 'distributed-attr[{extra}]'") from None
    return obstore


def split(location: str) -> tuple[str, str]:
    """``("s3://bucket", "path/in/bucket")`` for a URL."""
    s, _, rest = str(location).partition("://")
    bucket, _, key = rest.partition("/")
    return f"{s}://{bucket}", key.strip("/")


def set_retry_window(seconds: float) -> float:
    """Retry failed object-store requests for ``seconds`` in the stores opened from now on in this
    process (the driver and every actor set it from ``run.storage_retry_seconds``); returns the
    previous window."""
    global _retry_seconds
    previous, _retry_seconds = _retry_seconds, float(seconds)
    return previous


def retry_window() -> float:
    return _retry_seconds


def retry_config(seconds: float | None = None) -> dict[str, Any]:
    """obstore's ``retry_config`` for a window of ``seconds``: exponential backoff with jitter from
    0.1 s, at most 5 s between tries (so a server that is back is used within seconds), as many
    tries as fit in the window. obstore retries connection errors, 5xx answers, and timeouts of
    requests that are safe to repeat (reads, overwriting PUTs); a conditional PUT that timed out is
    not retried, since it may have landed: the lease handles that itself (``io/lease.py``)."""
    seconds = _retry_seconds if seconds is None else float(seconds)
    return {"max_retries": 10 + int(seconds * 10), "retry_timeout": timedelta(seconds=seconds),
            "backoff": {"init_backoff": timedelta(milliseconds=100),
                        "max_backoff": timedelta(seconds=min(5.0, max(0.1, seconds / 4))), "base": 2}}


def _obstore_kwargs(storage_options: dict[str, Any] | None, location: str) -> dict[str, Any]:
    opts = dict(storage_options or {})
    client = opts.pop("client_options", None)
    kwargs: dict[str, Any] = {"config": opts} if opts else {}
    if client:
        client = dict(client)
        for key, name in _CLIENT_FROM_ENV.get(SCHEMES.get(scheme(location), ""), {}).items():
            if key not in client and name in os.environ:
                client[key] = os.environ[name].strip().lower() in ("1", "true", "yes", "on")
        kwargs["client_options"] = client
    kwargs["retry_config"] = retry_config()
    return kwargs


#: what the first part of obstore's messages (before its "Debug source:" dump, which names every
#: setting, ``retry_timeout`` included) says of a fault that may pass: no answer (refused, reset, timed
#: out, cut short), or a server error (5xx, S3's SlowDown); after retrying it adds "after N retries"
_TRANSIENT = re.compile(r"error sending request|timed out|connection (refused|reset|closed|aborted)|broken pipe|"
                        r"reset by peer|incomplete message|body error|status code: 5\d\d|service unavailable|"
                        r"slow ?down|after \d+ retries", re.IGNORECASE)


def is_transient(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is an object-store fault that may pass
    with time: the server unreachable, too slow, or failing on its side. A refusal (credentials,
    a missing bucket or key, a failed precondition) is not. ``exc.transient = True`` marks one
    whose cause is lost on the way (Ray pickles an exception without its ``__cause__``)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (ConnectionError, TimeoutError)) or getattr(exc, "transient", False) is True:
            return True
        try:
            from obstore.exceptions import GenericError
        except ImportError:
            GenericError = ()  # type: ignore[assignment,misc]  (no obstore: no object storage)
        if GenericError and type(exc) is GenericError and _TRANSIENT.search(str(exc).split("Debug source:")[0]):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def call_with_retries(fn: Callable[[], T], seconds: float | None = None,
                      before_retry: Callable[[], None] | None = None) -> T:
    """``fn()``, called again with exponential backoff (0.2 s doubling, at most 5 s) while it fails
    with a transient object-store fault (``is_transient``), until ``seconds`` (default: the retry
    window) have passed since the first call; then its last error is raised. ``before_retry`` runs
    before each new try (the driver checks its lease there). For operations that are safe to
    repeat as a whole."""
    deadline = time.monotonic() + (_retry_seconds if seconds is None else float(seconds))
    delay = 0.2
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(5.0, delay * 2)
        if before_retry is not None:
            before_retry()


def object_store(location: str, storage_options: dict[str, Any] | None = None) -> Any:
    """An obstore store rooted at ``location`` (its keys are relative to the URL's path)."""
    _require_obstore(location, "location")
    from obstore.store import from_url

    try:
        return from_url(str(location).rstrip("/"), **_obstore_kwargs(storage_options, location))
    except Exception as exc:
        raise StorageError(f"cannot open {location!r}: {type(exc).__name__}: {exc}") from None


def zarr_store(location: str, storage_options: dict[str, Any] | None = None, read_only: bool = False) -> Any:
    """The zarr store for a location: ``LocalStore`` for a path, ``ObjectStore`` for a URL."""
    if not is_remote(location):
        from zarr.storage import LocalStore

        return LocalStore(local_path(location), read_only=read_only)
    from zarr.storage import ObjectStore

    return ObjectStore(object_store(location, storage_options), read_only=read_only)


def filesystem(location: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """An fsspec file system and the location's path in it (bucket/key, no scheme), for sources
    and weights on object storage."""
    check_location(location, "location")
    from obstore.fsspec import FsspecStore

    s = scheme(location)
    kwargs = _obstore_kwargs(storage_options, location)
    fs = FsspecStore(_FSSPEC_PROTOCOL[s], **kwargs)
    return fs, str(location).partition("://")[2].rstrip("/")


def read_bytes(location: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """A whole file, local or remote (model weights, small files)."""
    if not is_remote(location):
        with open(local_path(location), "rb") as fh:
            return fh.read()
    fs, path = filesystem(location, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{location!r} does not exist") from None
    except Exception as exc:
        raise StorageError(f"cannot read {location!r}: {type(exc).__name__}: {exc}") from None


def join(location: str, *parts: str) -> str:
    if is_remote(location):
        return posixpath.join(str(location).rstrip("/"), *parts)
    import os

    return os.path.join(local_path(location), *parts)


def basename(location: str) -> str:
    return posixpath.basename(str(location).rstrip("/"))


def redact(storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """``storage_options`` fit to record: the value of every key that names a secret replaced."""
    out: dict[str, Any] = {}
    for k, v in (storage_options or {}).items():
        if isinstance(v, dict):
            out[k] = redact(v)
        elif any(w in str(k).lower() for w in _SECRET_WORDS):
            out[k] = "<redacted>"
        else:
            out[k] = v
    return out


def describe_error(exc: BaseException, location: str) -> str:
    """One line for an object-store failure, with what to check."""
    name = type(exc).__name__
    text = str(exc).splitlines()[0][:300] if str(exc) else name
    hint = ""
    low = str(exc).lower()
    if any(w in low for w in ("accessdenied", "forbidden", "403", "invalidaccesskeyid", "signaturedoesnotmatch")):
        hint = (" (credentials refused: check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, the instance role, "
                "or the cloud's equivalent)")
    elif "nosuchbucket" in low or ("bucket" in low and "not exist" in low):
        hint = " (the bucket does not exist)"
    return f"{location!r}: {name}: {text}{hint}"
