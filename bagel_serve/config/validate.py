"""The one typed validator: the deploy YAML schema, `Request` and `EngineOptions` (and, later, HTTP bodies)
are dataclasses whose type hints and field metadata say what each field takes; this module checks values
against them and says, in one vocabulary, what was expected.

Declare a field with `opt(default, ge=, gt=, le=, lt=, multiple_of=, choices=, builtin=)`:

* types come from the type hints: `int`, `float`, `bool`, `str`, `X | None`, `list[X]`, `dict[str, X]`,
  `tuple[X, Y]`, a nested dataclass (built from a mapping), `Any`, or any other class (an `isinstance`
  check, e.g. `torch.Tensor`); a union of several of these takes the first that fits;
* a `bool` field takes only booleans (Python's or numpy's): `"no"`, `0` and `1` are errors, and a bool is
  never an `int` or a `float`;
* an `int` field takes Python and numpy integers (returned as `int`); a `float` field takes integers and
  Python or numpy floats (returned as `float`) and refuses NaN and ±inf;
* bounds (`ge`, `gt`, `le`, `lt`, `multiple_of`) apply to numbers, `choices` to anything;
* `builtin` is the value a field whose declared default is None ("not given") takes when nothing else
  gives it one (see `engine/request.py`).

Every error is a `ValidationError` with the path of the offending value (`stages[0].max_num_seqs`,
`cfg_interval[1]`) and a reason of the form "must be <what was expected>, got <value>"; callers prefix the
file, the request or the flag. Messages read the same in both styles: `style="yaml"` says `true`/`null`,
`style="python"` says `True`/`None`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from dataclasses import field
from typing import Any, Mapping

__all__ = ["ValidationError", "opt", "check", "check_field", "build", "yaml_fields", "known_keys",
           "expected", "short", "non_optional", "MISSING"]

MISSING = dataclasses.MISSING


class ValidationError(ValueError):
    """A value does not fit its declared field. `path` locates it, `reason` says what was expected."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}" if path else reason)
        self.path = path
        self.reason = reason


def opt(default: Any = MISSING, *, factory: Any = None, ge: float | None = None, gt: float | None = None,
        le: float | None = None, lt: float | None = None, multiple_of: int | None = None,
        choices: tuple | None = None, builtin: Any = MISSING, internal: bool = False) -> Any:
    """A dataclass field with validation metadata (see the module docstring). `internal` fields are not
    part of the schema (not settable from a mapping)."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "multiple_of": multiple_of, "choices": choices,
            "builtin": builtin, "internal": internal}
    kwargs: dict[str, Any] = {"metadata": meta}
    if factory is not None:
        kwargs["default_factory"] = factory
    elif default is not MISSING:
        kwargs["default"] = default
    if internal:
        kwargs.update(repr=False, compare=False)
    return field(**kwargs)


# ---------------------------------------------------------------------------------------------------------
# What a field expects, in words.


def short(value: Any) -> str:
    """repr() of a value, cut to 60 characters (tensors and images by type and shape)."""
    if getattr(value, "ndim", 0) and hasattr(value, "dtype"):  # arrays and tensors, not numpy scalars
        return f"{type(value).__name__} of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**64 else repr(x)


def _bounds(meta: Mapping[str, Any]) -> str:
    lo = ("[", meta["ge"]) if meta.get("ge") is not None else ("(", meta["gt"]) if meta.get("gt") is not None else None
    hi = ("]", meta["le"]) if meta.get("le") is not None else (")", meta["lt"]) if meta.get("lt") is not None else None
    if lo and hi:
        return f" in {lo[0]}{_num(lo[1])}, {_num(hi[1])}{hi[0]}"
    if lo:
        return f" {'>=' if lo[0] == '[' else '>'} {_num(lo[1])}"
    if hi:
        return f" {'<=' if hi[0] == ']' else '<'} {_num(hi[1])}"
    return ""


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _members(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def non_optional(tp: Any) -> Any:
    """`X` for `X | None` (for checking a value that was given: None there means "not given")."""
    if _is_optional(tp):
        members = _members(tp)
        return members[0] if len(members) == 1 else typing.Union[tuple(members)]
    return tp


def _words(tp: Any, meta: Mapping[str, Any], style: str) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false" if style == "yaml" else "True or False"
    if tp is int:
        if meta.get("multiple_of"):
            return f"a multiple of {meta['multiple_of']}" + (_bounds(meta) and "," + _bounds(meta))
        return "an integer" + _bounds(meta)
    if tp is float:
        return "a finite number" + _bounds(meta)
    if tp is str:
        return "a string"
    if origin is dict or tp is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is list or tp is list:
        return "a list"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return "a sequence"
        return f"{len(args)} values"
    if tp is Any:
        return "anything"
    return getattr(tp, "__name__", str(tp))


def expected(tp: Any, meta: Mapping[str, Any] | None = None, style: str = "yaml") -> str:
    """What a field of type `tp` with metadata `meta` takes, in words ("an integer in [2, 1000] or null")."""
    meta = meta or {}
    if meta.get("choices") is not None:
        text = "one of " + ", ".join(map(str, meta["choices"]))
    else:
        text = " or ".join(_words(a, meta, style) for a in _members(tp))
    if _is_optional(tp):
        text += " or null" if style == "yaml" else " or None"
    return text


# ---------------------------------------------------------------------------------------------------------
# Checking values.


class _Mismatch(Exception):
    """The value is not of the expected type (turned into a ValidationError by the caller)."""


def _is_numpy(value: Any, kind: str) -> bool:
    mod = type(value).__module__
    if not mod.startswith("numpy"):
        return False
    import numpy as np

    return isinstance(value, {"int": np.integer, "float": np.floating, "bool": np.bool_}[kind])


def _convert(value: Any, tp: Any, path: str, style: str) -> Any:
    """`value` as type `tp` (recursing into containers), or _Mismatch / a ValidationError from inside."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in typing.get_args(tp):
                return None
            raise _Mismatch
        for member in _members(tp):
            try:
                return _convert(value, member, path, style)
            except _Mismatch:
                continue
        raise _Mismatch
    if value is None:
        raise _Mismatch
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return build(tp, value, path, style=style)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        key_tp, val_tp = typing.get_args(tp) or (Any, Any)
        out = {}
        for k, v in value.items():
            if key_tp is str and not isinstance(k, str):
                raise ValidationError(path, f"keys must be strings, got {short(k)}")
            out[k] = check(v, val_tp, f"{path}.{k}", style=style)
        return out
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise _Mismatch
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [check(v, item_tp, f"{path}[{i}]", style=style) for i, v in enumerate(value)]
    if origin is tuple:
        if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
            raise _Mismatch
        items = list(value)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(items)
        if len(items) != len(args):
            raise _Mismatch
        return tuple(check(v, a, f"{path}[{i}]", style=style) for i, (v, a) in enumerate(zip(items, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if _is_numpy(value, "bool"):
            return bool(value)
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool) or _is_numpy(value, "bool"):
            raise _Mismatch
        if isinstance(value, int):
            return int(value)
        if _is_numpy(value, "int"):
            return int(value)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool) or _is_numpy(value, "bool"):
            raise _Mismatch
        if isinstance(value, (int, float)) or _is_numpy(value, "int") or _is_numpy(value, "float"):
            try:
                out = float(value)
            except OverflowError:  # an int too large for a float
                raise _Mismatch from None
            if not math.isfinite(out):
                raise _Mismatch
            return out
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported schema type {tp!r} at {path}")


def _check_bounds(value: Any, meta: Mapping[str, Any]) -> bool:
    if meta.get("choices") is not None and value not in meta["choices"]:
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("ge") is not None and not value >= meta["ge"]:
            return False
        if meta.get("gt") is not None and not value > meta["gt"]:
            return False
        if meta.get("le") is not None and not value <= meta["le"]:
            return False
        if meta.get("lt") is not None and not value < meta["lt"]:
            return False
        if meta.get("multiple_of") and (not isinstance(value, int) or value % meta["multiple_of"]):
            return False
    return True


def check(value: Any, tp: Any, path: str, meta: Mapping[str, Any] | None = None, *, style: str = "yaml") -> Any:
    """`value` converted to type `tp` and checked against `meta`'s bounds; else a ValidationError at `path`
    saying what was expected."""
    meta = meta or {}
    try:
        out = _convert(value, tp, path, style)
    except _Mismatch:
        raise ValidationError(path, f"must be {expected(tp, meta, style)}, got {short(value)}") from None
    if out is not None and not _check_bounds(out, meta):
        raise ValidationError(path, f"must be {expected(tp, meta, style)}, got {short(value)}")
    return out


def check_field(f: dataclasses.Field, tp: Any, value: Any, path: str, *, style: str = "yaml",
                given: bool = False) -> Any:
    """`check` with a dataclass field's metadata. `given`: None means "not given" for this field, so it is
    returned as is and the messages do not offer None as a value."""
    if given and _is_optional(tp):
        if value is None:
            return None
        tp = non_optional(tp)
    return check(value, tp, path, f.metadata, style=style)


# ---------------------------------------------------------------------------------------------------------
# Building dataclasses from mappings.


@functools.cache
def type_hints(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints(cls)`, worked out once per class: resolving the string annotations costs about
    a millisecond a class, paid on every request body otherwise."""
    return typing.get_type_hints(cls)


def yaml_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of a schema dataclass a mapping may set (all but the internal ones)."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def known_keys(cls: type) -> list[str]:
    """Keys a mapping for `cls` may hold: its fields plus the aliases its `_extra_keys()` names."""
    extra = cls._extra_keys() if hasattr(cls, "_extra_keys") else ()
    return sorted([*yaml_fields(cls), *extra])


def build(cls: type, data: Mapping[str, Any], path: str = "", *, style: str = "yaml", **internal: Any) -> Any:
    """An instance of the dataclass `cls` from a mapping: unknown keys (with a did-you-mean), missing
    required keys and bad values are ValidationErrors naming their path. A class may define
    `_preprocess(data, path)` (classmethod: normalise aliases first) and `_check(path)` (cross-field rules)."""
    if hasattr(cls, "_preprocess"):
        data = cls._preprocess(dict(data), path)
    fields = yaml_fields(cls)
    hints = type_hints(cls)
    p = f"{path}." if path else ""
    kwargs: dict[str, Any] = {}
    for key, raw in data.items():
        if not isinstance(key, str):
            raise ValidationError(path, f"keys must be strings, got {short(key)}")
        if key not in fields:
            known = known_keys(cls)
            hint = difflib.get_close_matches(key, known, n=1)
            did = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ValidationError(f"{p}{key}", f"unknown key (known: {', '.join(known)}){did}")
        kwargs[key] = check_field(fields[key], hints[key], raw, f"{p}{key}", style=style)
    for name, f in fields.items():
        if name not in kwargs and f.default is MISSING and f.default_factory is MISSING:
            raise ValidationError(f"{p}{name}", "required key is missing")
    obj = cls(**kwargs, **internal)
    if hasattr(obj, "_check"):
        obj._check(path)
    return obj
