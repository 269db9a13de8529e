"""A small, typed registry shared by attribution methods and evaluation metrics.

Each registered class declares its parameters as a dataclass (``Params``); the registry turns a
name plus keyword arguments into a configured instance and, when either is wrong, raises an error
that lists what is valid -- so a typo in a YAML file names the key and the allowed values.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name or parameter; the message lists the valid ones."""


def _check_finite(value: Any, where: str) -> None:
    """Refuse NaN and +/-inf anywhere in ``value`` (numbers, list elements, mapping values)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RegistryError(f"{where}: expected a finite number, got {value!r}")
    if isinstance(value, (list, tuple)):
        for v in value:
            _check_finite(v, where)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{where}.{k}")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Coerce YAML-ish values (lists, ints) into the annotated field type, or raise naming ``where``.

    NaN and +/-inf are refused whatever the annotation: no setting has a use for them, and a NaN
    compares unequal to itself, which would also defeat the resume check."""
    _check_finite(value, where)
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any or annotation is None:
        return value
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RegistryError as exc:
                errors.append(str(exc))
        raise RegistryError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise RegistryError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            value = [value]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise RegistryError(f"{where}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(v, a, where) for v, a in zip(value, args))
        inner = args[0] if args else Any
        return origin(_coerce(v, inner, where) for v in value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise RegistryError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise RegistryError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RegistryError(f"{where}: expected a number, got {value!r}")
        try:
            out = float(value)
        except OverflowError:  # an integer beyond float range
            raise RegistryError(f"{where}: expected a finite number, got {value!r}") from None
        if not math.isfinite(out):
            raise RegistryError(f"{where}: expected a finite number, got {value!r}")
        return out
    if annotation is str:
        if not isinstance(value, str):
            raise RegistryError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def build_params(params_cls: type, values: dict[str, Any], where: str) -> Any:
    """Instantiate the ``Params`` dataclass from ``values``, validating names and types."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    hints = typing.get_type_hints(params_cls)
    values = rename_params(params_cls, values, where, warn=True)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        valid = ", ".join(f"{n}={_default_repr(f)}" for n, f in fields.items()) or "(none)"
        raise RegistryError(f"{where}: unknown parameter(s) {unknown}; valid parameters: {valid}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    obj = params_cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        try:
            check()
        except ValueError as exc:
            raise RegistryError(f"{where}: {exc}") from None
    return obj


def rename_params(params_cls: type, values: dict[str, Any], where: str, warn: bool = False) -> dict[str, Any]:
    """``values`` with parameters renamed since an earlier version given their current names
    (``Params.RENAMED``: old name -> (new name, {old value: new value} or None)), so old configs
    and the configs stored in old stores keep working. Giving both names is an error."""
    renamed: dict[str, tuple[str, dict[Any, Any] | None]] = getattr(params_cls, "RENAMED", {})
    if not renamed or not any(k in values for k in renamed):
        return values
    out = dict(values)
    for old, (new, mapping) in renamed.items():
        if old not in out:
            continue
        if new in out:
            raise RegistryError(f"{where}: {old!r} is the former name of {new!r}; give {new!r} only")
        value = out.pop(old)
        if mapping is not None:
            if value not in mapping:
                raise RegistryError(f"{where}.{old}: {value!r} is not one of {list(mapping)} "
                                    f"(and {old!r} is now {new!r}: {list(mapping.values())})")
            value = mapping[value]
        out[new] = value
        if warn:
            import warnings

            warnings.warn(f"{where}.{old}: renamed to {new!r}; read as {new}: {value!r}", FutureWarning,
                          stacklevel=3)
    return out


def _default_repr(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return repr(field.default)
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(field.default_factory())  # type: ignore[misc]
    return "<required>"


def describe_params(params_cls: type) -> dict[str, Any]:
    """``{name: default}`` for every parameter of a ``Params`` dataclass."""
    out = {}
    for f in dataclasses.fields(params_cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


class Configurable:
    """A registered class configured by a ``Params`` dataclass: methods and metrics. Errors in
    its parameters name the config key, ``<section>.<name>.<parameter>``."""

    #: the config section the class is read from ("methods", "metrics")
    section: typing.ClassVar[str]
    name: typing.ClassVar[str]

    @dataclasses.dataclass
    class Params:
        pass

    def __init__(self, **params: Any):
        self.params = build_params(self.Params, params, where=f"{self.section}.{self.name}")


class Registry(Generic[T]):
    """Name -> class. ``kind`` ("method", "metric") appears in error messages."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, type[T]] = {}

    def register(self, cls: type[T]) -> type[T]:
        name = getattr(cls, "name")
        if name in self._items and self._items[name] is not cls:
            raise RegistryError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = cls
        return cls

    def get(self, name: str) -> type[T]:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {sorted(self._items)}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(sorted(self._items))
