"""Typed validation of JSON configuration: one mechanism for settings, lesion specs and experiment configs.

A dataclass describes a JSON object: each field's annotation is the expected JSON type, and optional field
metadata (:func:`bounds`, :func:`choices`) its range. :func:`validate` checks a parsed JSON dict against it
and returns the values converted to the annotated types (an int where a float is expected, a tuple where a
tuple is annotated), or raises naming the file, the key, the expected type and the value::

    lesion_spec.json: key 'lesions[0].radius_mm[0][1]' must be a number in (0, 100], got 500

Why not ``float(x)`` / ``bool(x)`` casts where a value is used: ``bool("no")`` is True, ``float("half")``
raises an error that names neither the file nor the key, and a list where a number was meant fails far from
its cause. JSON booleans are accepted only as ``true``/``false``; integers only as whole JSON numbers.

Supported annotations: ``bool``, ``int``, ``float`` (any JSON number), ``str``, ``Any``, ``dict`` /
``dict[str, T]``, ``list`` / ``list[T]``, ``tuple[T, ...]`` (a JSON list of fixed length), ``X | None`` /
``Optional[X]`` / ``Union[...]`` and nested dataclasses (JSON objects with their own keys).
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from typing import Any, Callable

#: metadata keys read by :func:`validate`
_BOUNDS, _CHOICES = "schema_bounds", "schema_choices"


class SchemaError(ValueError):
    """A JSON value of the wrong type or out of range. ``source``, ``key``, ``expected`` and ``value`` say which."""

    def __init__(self, source: str, key: str, expected: str, value: Any):
        self.source, self.key, self.expected, self.value = source, key, expected, value
        super().__init__(f"{source}: key '{key}' must be {expected}, got {_show(value)}")


def bounds(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
           **more) -> dict:
    """Field metadata: every number in the value (also inside lists) lies in [lo, hi] (or open ends)."""
    return {_BOUNDS: (lo, hi, lo_open, hi_open), **more}


def choices(*allowed: Any, **more) -> dict:
    """Field metadata: a string value must be one of ``allowed``."""
    return {_CHOICES: tuple(allowed), **more}


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _range_text(b: tuple) -> str:
    lo, hi, lo_open, hi_open = b
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"{'<' if hi_open else '<='} {hi:g}"


def describe(tp: Any, meta: dict | None = None) -> str:
    """The expected JSON type of an annotation, in words ("a number in (0, 1]", "true or false", ...)."""
    meta = meta or {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    rng = f" {_range_text(meta[_BOUNDS])}" if _BOUNDS in meta else ""
    if tp is Any:
        return "any JSON value"
    if tp is bool:
        return "true or false"
    if tp is int:
        return f"an integer{rng}"
    if tp is float:
        return f"a number{rng}"
    if tp is str:
        return f"one of {list(meta[_CHOICES])}" if _CHOICES in meta else "a string"
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a, meta) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if tp is dict or origin is dict:
        return "a JSON object" + (f" of {_plural(describe(args[1], meta))}" if len(args) == 2 and args[1] is not Any else "")
    if tp is list or origin is list:
        return "a list" + (f" of {_plural(describe(args[0], meta))}" if args else "")
    if origin is tuple:
        return "[" + ", ".join(describe(a, meta) for a in args) + "]"
    if dataclasses.is_dataclass(tp):
        return f"a JSON object with keys {sorted(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _plural(text: str) -> str:
    if " or " in text and not text.startswith("["):
        return " or ".join(_plural(t) for t in text.split(" or "))
    for a, b in (("an integer", "integers"), ("a number", "numbers"), ("a string", "strings"),
                 ("true or false", "true/false values"), ("a list", "lists"), ("a JSON object", "JSON objects")):
        if text.startswith(a):
            return b + text[len(a):]
    return text


def check_value(value: Any, tp: Any, key: str, source: str, meta: dict | None = None) -> Any:
    """``value`` converted to annotation ``tp``; :class:`SchemaError` naming ``source`` and ``key`` otherwise."""
    meta = meta or {}
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    given = value   # the value as written in the file, for the message

    def bad() -> SchemaError:
        return SchemaError(source, key, describe(tp, meta), given)

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return check_value(value, a, key, source, meta)
            except SchemaError as e:
                # the arm of the right JSON kind failed: an element's error names the element (more precise than
                # the union); a range or choice error of the value itself gives the whole union ("... or null")
                if _kind_matches(value, a):
                    if e.key != key:
                        raise
                    raise bad() from None
        raise bad()
    if tp is bool:
        if type(value) is not bool:
            raise bad()
        return value
    if tp is int or tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise bad()
        if tp is int and not isinstance(value, int):
            raise bad()
        value = int(value) if tp is int else float(value)
        b = meta.get(_BOUNDS)
        if b is not None:
            lo, hi, lo_open, hi_open = b
            if (lo is not None and (value < lo or (lo_open and value == lo))) or \
                    (hi is not None and (value > hi or (hi_open and value == hi))):
                raise bad()
        return value
    if tp is str:
        if not isinstance(value, str) or (_CHOICES in meta and value not in meta[_CHOICES]):
            raise bad()
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad()
        if len(args) == 2:
            return {k: check_value(v, args[1], f"{key}.{k}", source, meta) for k, v in value.items()}
        return dict(value)
    if tp is list or origin is list:
        if not isinstance(value, (list, tuple)):
            raise bad()
        if args:
            return [check_value(v, args[0], f"{key}[{i}]", source, meta) for i, v in enumerate(value)]
        return list(value)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad()
        return tuple(check_value(v, a, f"{key}[{i}]", source, meta) for i, (v, a) in enumerate(zip(value, args)))
    if dataclasses.is_dataclass(tp):
        return validate(tp, value, source, prefix=key)
    raise TypeError(f"schema: unsupported annotation {tp!r} for key '{key}'")


def _kind_matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` has the JSON kind (number, string, list, object) of annotation ``tp``."""
    origin = typing.get_origin(tp) or tp
    if origin in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is str:
        return isinstance(value, str)
    if origin in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or dataclasses.is_dataclass(tp):
        return isinstance(value, dict)
    return False


def fields_of(cls: type) -> dict[str, tuple[Any, dict]]:
    """{field name: (resolved annotation, metadata)} of dataclass ``cls`` (fields with init=True)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], dict(f.metadata)) for f in dataclasses.fields(cls) if f.init}


def validate(cls: type, d: Any, source: str, prefix: str = "", skip: tuple[str, ...] = (),
             error: Callable[[str], Exception] | None = None) -> dict:
    """Check JSON object ``d`` against dataclass ``cls``: every key known, every value of its field's type and
    range. Returns {key: converted value} for the keys present (defaults are the dataclass's business).
    ``skip``: fields not read from the JSON (checked by the caller); ``error``: build the exception raised
    instead of :class:`SchemaError` from its message (the caller's own error class)."""
    try:
        where = f"'{prefix}'" if prefix else "the top level"
        if not isinstance(d, dict):
            raise SchemaError(source, prefix or "<top level>", describe(cls), d) if prefix else \
                _TopLevel(source, f"{source}: {where} must be a JSON object {{...}}, got {type(d).__name__} "
                                  f"{_show(d)}")
        known = {k: v for k, v in fields_of(cls).items() if k not in skip}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise _TopLevel(source, f"{source}: unknown keys {[f'{prefix}.{k}' if prefix else k for k in unknown]}"
                                    f" in {where}; known: {sorted(known)}")
        return {k: check_value(v, known[k][0], f"{prefix}.{k}" if prefix else k, source, known[k][1])
                for k, v in d.items()}
    except (SchemaError, _TopLevel) as e:
        if error is not None:
            raise error(str(e)) from None
        raise


class _TopLevel(SchemaError):
    """A whole object is wrong (not an object, unknown keys): the message is built by the caller."""

    def __init__(self, source: str, message: str):
        ValueError.__init__(self, message)
        self.source, self.key, self.expected, self.value = source, "", "", None
