"""A small, typed registry shared by attribution methods and evaluation metrics.

Each registered class declares its parameters as a dataclass (``Params``); the registry turns a
name plus keyword arguments into a configured instance and, when either is wrong, raises an error
that lists what is valid -- so a typo in a YAML file names the key and the allowed values.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Generic, TypeVar

import pydantic
from pydantic_core import PydanticCustomError, PydanticKnownError

T = TypeVar("T")


class RegistryError(ValueError):
    """An unknown name or parameter; the message lists the valid ones."""


class FieldError(ValueError):
    """Raised by a ``Params.validate`` about one field: the message is given that field's key
    (``data.format: ...``) rather than the section's."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


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


# -- validation by pydantic ------------------------------------------------------------------------
#
# Each field's annotation is validated by a pydantic ``TypeAdapter`` in strict mode (no strings read
# as numbers, no bools as ints), so nested types are checked too (list elements, tuple lengths,
# mapping values). ``_lenient`` rewrites the annotation first with what YAML and the Python API
# give that strict mode would refuse: lists for tuples, a scalar for a one-element list, an int
# for a float and an integral float (3.0) for an int. Unions are tried member by member, left to
# right, as before. Every error is one of ours (``_fail``), so the message reads as it always has.

_STRICT = pydantic.ConfigDict(strict=True, allow_inf_nan=False)
#: what a value of a leaf type is called in messages
_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
#: pydantic's errors in our words
_MESSAGES = {"int_type": "expected an integer", "float_type": "expected a number",
             "bool_type": "expected true or false", "string_type": "expected a string",
             "finite_number": "expected a finite number"}
#: the errors of a value of the wrong kind (a string for an int)
_WRONG_KIND = {"int_type", "float_type", "bool_type", "string_type"}


def _fail(message: str) -> PydanticCustomError:
    return PydanticCustomError("registry", "{message}", {"message": message})


def _to_float(value: Any) -> Any:
    """An int for a float field becomes a float; one beyond float range is refused. Only Python's
    numbers are (pydantic would also take NumPy's, ``np.bool_`` as 1.0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticKnownError("float_type")
    try:
        return float(value)
    except OverflowError:
        raise _fail(f"expected a finite number, got {value!r}") from None


def _to_int(value: Any) -> Any:
    """A float with an integral value (3.0, as YAML may write it) for an int field becomes an int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _to_sequence(kind: type, item: Any, length: int | None = None) -> Any:
    """YAML gives lists where a tuple is annotated, and a scalar where a list is expected is a
    one-element list (``sweep: 15``), checked as the element (an error names the key, not
    ``[0]``). A fixed-length tuple checks its length here, to say so in one message."""
    def convert(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            value = list(value)
        elif item is not None:  # (raises the element's error as the field's)
            value = [_adapter(item).validate_python(value)]
        else:
            value = [value]
        if length is not None and len(value) != length:
            raise _fail(f"expected {length} values, got {value!r}")
        return kind(value)
    return convert


def _mapping(value: Any) -> Any:
    """A bare ``dict`` annotation: any mapping, kept as given (keyword arguments for a factory)."""
    if not isinstance(value, Mapping):
        raise _fail(f"expected a mapping of keys to values, got {value!r}")
    return value


def _to_dict(value: Any) -> Any:
    """Any mapping where a ``dict[K, V]`` is annotated (its keys and values are checked)."""
    return dict(_mapping(value))


def _literal(args: tuple[Any, ...]) -> Any:
    """pydantic checks the value; the message lists the allowed ones. A bool is no int here either
    (pydantic would read ``True`` as ``1`` for ``Literal[1, 3]``)."""
    bool_allowed = any(isinstance(a, bool) for a in args)

    def check(value: Any, handler: Any) -> Any:
        if bool_allowed or not isinstance(value, bool):
            try:
                return handler(value)
            except pydantic.ValidationError:
                pass
        raise _fail(f"{value!r} is not one of {list(args)}")
    return check


def _union(members: tuple[Any, ...], optional: bool) -> Any:
    """The first member that accepts the value (left to right). Otherwise, when every member is a
    plain type or a Literal, one message naming them all ("expected an integer or 'auto'");
    else the error of the first member of the value's kind (a sequence member for a list, as
    ``low: ['a']`` is a list of numbers gone wrong, not a number gone wrong)."""

    def check(value: Any) -> Any:
        if value is None and optional:
            return None
        errors = []
        for member in members:
            try:
                return _adapter(member).validate_python(value)
            except pydantic.ValidationError as exc:
                errors.append(exc)
        names = [_describe(m) for m in members]
        if len(members) > 1 and all(names) and all(_wrong_kind(m, exc) for m, exc in zip(members, errors)):
            if typing.get_origin(members[0]) is typing.Literal:  # "'x' is not one of [...]" first
                first = errors[0].errors()[0]["ctx"]["message"]
                raise _fail(f"{first} and not " + " or ".join(names[1:]))
            raise _fail(f"expected {' or '.join(names)}, got {value!r}")
        is_seq = isinstance(value, (list, tuple))
        for member, exc in zip(members, errors):
            if (typing.get_origin(member) in (list, tuple)) == is_seq:
                raise exc
        raise errors[0]
    return check


def _wrong_kind(member: Any, exc: pydantic.ValidationError) -> bool:
    """Whether ``member`` refused the value for its kind (a string for an int, a value not in a
    Literal) rather than for something a message naming every member would hide (out of range)."""
    error = exc.errors()[0]
    if typing.get_origin(member) is typing.Literal:
        return error["type"] == "registry"  # _literal's "is not one of"
    return not error["loc"] and error["type"] in _WRONG_KIND


def _describe(annotation: Any) -> str | None:
    """"an integer", "'auto'", "one of ['a', 'b']"; None for other types."""
    if typing.get_origin(annotation) is typing.Literal:
        args = typing.get_args(annotation)
        return repr(args[0]) if len(args) == 1 else f"one of {list(args)}"
    return _NAMES.get(annotation)


def _lenient(annotation: Any) -> Any:
    """``annotation`` rewritten for pydantic with the accepted inputs (see above). Types this
    registry does not know (tensors, modules, callables, ``Any``) are passed through unchecked:
    the Python API may hand over objects no config file could."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        members = tuple(a for a in args if a is not type(None))
        return Annotated[Any, pydantic.PlainValidator(_union(members, len(members) < len(args)))]
    if origin is typing.Literal:  # (strict pydantic reads 3.0 as 3 for Literal[1, 3], as for an int)
        return Annotated[annotation, pydantic.WrapValidator(_literal(args))]
    if annotation in (list, tuple) or origin in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:  # tuple[int, int]
            fixed: Any = tuple[tuple(_lenient(a) for a in args)]  # type: ignore[misc]
            return Annotated[fixed, pydantic.BeforeValidator(_to_sequence(tuple, None, len(args)))]
        item = args[0] if args else Any
        if tuple in (annotation, origin):  # (strict pydantic takes no list for a tuple)
            return Annotated[tuple[_lenient(item), ...], pydantic.BeforeValidator(_to_sequence(tuple, item))]
        return Annotated[list[_lenient(item)], pydantic.BeforeValidator(_to_sequence(list, item))]
    if annotation is dict:
        return Annotated[Any, pydantic.BeforeValidator(_mapping)]
    if origin is dict:
        key, value = (_lenient(a) for a in args) if args else (Any, Any)
        return Annotated[dict[key, value], pydantic.BeforeValidator(_to_dict)]  # type: ignore[valid-type]
    if annotation is float:
        return Annotated[float, pydantic.BeforeValidator(_to_float)]
    if annotation is int:
        return Annotated[int, pydantic.BeforeValidator(_to_int)]
    if annotation in (bool, str, type(None)):
        return annotation
    return Any


@functools.lru_cache(maxsize=None)
def _adapter(annotation: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(_lenient(annotation), config=_STRICT)


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """``value`` validated against the annotated field type (and converted: see ``_lenient``), or
    a ``RegistryError`` naming ``where`` -- and, inside a list or mapping, the element.

    NaN and +/-inf are refused whatever the annotation: no setting has a use for them, and a NaN
    compares unequal to itself, which would also defeat the resume check."""
    _check_finite(value, where)
    if annotation is Any:
        return value
    try:
        return _adapter(annotation).validate_python(value)
    except pydantic.ValidationError as exc:
        raise RegistryError(_message(exc.errors(include_url=False)[0], where)) from None


def _message(error: Any, where: str) -> str:
    """A pydantic error as ``<where>[.key][[index]]: <what was expected>, got <value>``."""
    for part in error["loc"]:
        where += f"[{part}]" if isinstance(part, int) else f".{part}"
    if error["type"] == "registry":
        return f"{where}: {error['ctx']['message']}"
    expected = _MESSAGES.get(error["type"], error["msg"].replace("Input should be", "expected"))
    return f"{where}: {expected}, got {error['input']!r}"


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
        except FieldError as exc:
            raise RegistryError(f"{where}.{exc.field}: {exc}") from None
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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dataclasses.asdict(self.params)})"

    #: the class attributes ``describe`` lists (besides the name, the parameters and the doc line)
    DESCRIBED: typing.ClassVar[tuple[str, ...]] = ()

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What ``list_methods`` / ``list_metrics`` and the CLI show of the class."""
        return {"name": cls.name, **{a: getattr(cls, a) for a in cls.DESCRIBED},
                "params": describe_params(cls.Params), "doc": (cls.__doc__ or "").strip().split("\n")[0]}


class Registry(Generic[T]):
    """Name -> class. ``kind`` ("method", "metric", "data format") appears in error messages.

    Classes join by ``register`` (a class decorator) when their module is imported: the built-in
    ones because their package imports all its modules (``import_modules``), those of other
    installed packages through the entry-point group ``group`` (``load_plugins``)."""

    def __init__(self, kind: str, group: str | None = None):
        self.kind = kind
        #: the entry-point group other packages declare their modules under
        self.group = group
        self._items: dict[str, type[T]] = {}
        #: entry point -> why its module did not import (said when a name is not found)
        self.plugin_errors: dict[str, str] = {}

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
                f"unknown {self.kind} {name!r}; valid {self.kind}s: {sorted(self._items)}{self.plugin_failures()}"
            ) from None

    __getitem__ = get

    def plugin_failures(self) -> str:
        """"; plugin 'x = pkg.mod' did not load: <error>" for each plugin that failed to import
        (empty when none did): what a message about a missing name should add."""
        return "".join(f"; plugin {ep!r} did not load: {why}" for ep, why in self.plugin_errors.items())

    def load_plugins(self) -> list[str]:
        """Import the modules that installed packages declare under the entry-point group
        (``[project.entry-points."distributed_attr.methods"] grid = "mypkg.grid"``), so that their
        ``register`` decorators run; returns the entry points loaded. One that fails to import
        is recorded, with its error, in ``plugin_errors`` (and named when a name is not found)
        instead of breaking every other method: an unrelated broken plugin must not stop a job."""
        if self.group is None:
            return []
        from importlib.metadata import entry_points

        loaded = []
        for ep in entry_points(group=self.group):
            key = f"{ep.name} = {ep.value}"
            try:
                ep.load()
            except Exception as exc:  # any error of foreign code: recorded and reported, not raised
                self.plugin_errors[key] = f"{type(exc).__name__}: {exc}"
                continue
            self.plugin_errors.pop(key, None)
            loaded.append(key)
        return loaded

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self):
        return iter(sorted(self._items))


def import_modules(package: str, path: typing.Iterable[str]) -> None:
    """Import every module of a package, so that the classes they define register themselves:
    adding a built-in method or metric is adding its file."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(path), key=lambda i: i.name):
        importlib.import_module(f"{package}.{info.name}")
