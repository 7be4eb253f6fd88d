"""The typed-model engine of result files: frozen dataclasses parsed from, and written back to, strict JSON.

A model is a frozen dataclass whose fields are the JSON keys (a `json_name` where the key is no Python
name). `Model.from_dict(d, where=...)` checks every key against its field's type (bool, int, float, str,
None, lists, str-keyed dicts, nested models, `Any` = any strict JSON value); a missing key is an error
unless the field is `opt()`; a NaN or infinity anywhere is an error. Keys the model does not declare are
kept in `extra` and written back by `to_dict`, so a reader never drops what a newer writer added, and the
tests assert that every writer's output leaves `extra` empty (the models describe every key written).
No torch: the report and the study read results without it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from vitprobe.errors import VitprobeError

M = TypeVar("M", bound="Model")


class ResultsError(VitprobeError):
    """A result file that is not strict JSON, not a vitprobe result, of an unknown version, or malformed."""


def opt(default: Any = None, *, json_name: str | None = None) -> Any:
    """A key writers may leave out (absent = `default`; `to_dict` leaves it out again when it is None)."""
    meta = {"optional": True, **({"json_name": json_name} if json_name else {})}
    return field(default=default, metadata=meta)


def key(json_name: str, default: Any = dataclasses.MISSING) -> Any:
    """A field whose JSON key is not a Python name (`"class"`)."""
    return field(default=default, metadata={"json_name": json_name})


@dataclass(frozen=True, kw_only=True)
class Model:
    """Base of every typed result model."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this model does not declare
    # keys with a default that the parsed file held (None: built in code); `to_dict` writes exactly those,
    # so a key one version of a writer leaves out stays out, and one it writes as null stays null
    present: frozenset[str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_dict(cls: type[M], data: Any, *, where: str = "") -> M:
        """Parse and check `data` (a dict as read from JSON, or as a writer built it)."""
        return cls(**cls._parse_fields(data, where))

    @classmethod
    def _parse_fields(cls, data: Any, where: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        """Constructor keyword arguments from `data`; keys in `skip` are neither parsed nor kept as extra."""
        if not isinstance(data, Mapping):
            raise ResultsError(
                f"{where or cls.__name__}: expected a JSON object, found {_kind(data)}", _fix(where)
            )
        values: dict[str, Any] = {}
        seen = set(skip)
        for f, tp in _fields(cls):
            name = f.metadata.get("json_name", f.name)
            if name in skip:
                continue
            seen.add(name)
            at = f"{where}.{name}" if where else name
            if name not in data:
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                    continue
                raise ResultsError(f"{at}: missing", _fix(where))
            values[f.name] = parse_value(tp, data[name], at)
        values["extra"] = {
            k: check_json(v, f"{where}.{k}" if where else k) for k, v in data.items() if k not in seen
        }
        values["present"] = frozenset(k for k in data if k in seen)
        return values

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: declared keys in order (optional ones only when set), then `extra`."""
        return self._dump_fields()

    def _dump_fields(self, skip: tuple[str, ...] = ()) -> dict[str, Any]:
        out: dict[str, Any] = {}
        has_default = dataclasses.MISSING
        for f, _ in _fields(type(self)):
            name = f.metadata.get("json_name", f.name)
            value = getattr(self, f.name)
            if name in skip:
                continue
            defaulted = f.default is not has_default or f.default_factory is not has_default
            if self.present is not None and defaulted and name not in self.present:
                continue  # the file did not have this key
            if self.present is None and f.metadata.get("optional") and value is None:
                continue
            out[name] = dump_value(value)
        out.update(self.extra)
        return out


_FIELD_CACHE: dict[type, list[tuple[dataclasses.Field, Any]]] = {}


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    if cls not in _FIELD_CACHE:
        hints = typing.get_type_hints(cls)
        _FIELD_CACHE[cls] = [
            (f, hints[f.name]) for f in dataclasses.fields(cls) if f.name not in ("extra", "present")
        ]
    return _FIELD_CACHE[cls]


def _fix(where: str) -> str:
    return "re-run the command that wrote this file with this vitprobe version (or restore the file)"


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def parse_value(tp: Any, value: Any, where: str) -> Any:
    """`value` checked against the type `tp` (see the module docstring); lists stay lists."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return check_json(value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _type_error(where, tp, value)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_value(arg, value, where)
            except ResultsError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else _type_error(where, tp, value)
    if tp is type(None):
        if value is not None:
            raise _type_error(where, tp, value)
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(where, tp, value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(where, tp, value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(where, tp, value)
        if not math.isfinite(value):
            raise _not_finite(where, value)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _type_error(where, tp, value)
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _type_error(where, tp, value)
        (item,) = typing.get_args(tp)[:1]
        return [parse_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _type_error(where, tp, value)
        _, item = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ResultsError(f"{where}: key {k!r} is not a string", _fix(where))
            out[k] = parse_value(item, v, f"{where}.{k}")
        return out
    if isinstance(tp, type) and issubclass(tp, Model):
        return tp.from_dict(value, where=where)
    raise TypeError(f"results schema: unsupported type {tp!r} at {where}")


def _not_finite(where: str, value: float) -> ResultsError:
    return ResultsError(f"{where}: {value} is not a finite number (strict JSON has no NaN)", _fix(where))


def _type_error(where: str, tp: Any, value: Any) -> ResultsError:
    name = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
    return ResultsError(f"{where}: expected {name}, found {_kind(value)} {_short(value)}", _fix(where))


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def dump_value(value: Any) -> Any:
    """A parsed value back to plain JSON data (models to dicts)."""
    if isinstance(value, Model):
        return value.to_dict()
    if isinstance(value, list):
        return [dump_value(v) for v in value]
    if isinstance(value, dict):
        return {k: dump_value(v) for k, v in value.items()}
    return value


def check_json(value: Any, where: str) -> Any:
    """`value` if it is strict JSON data (finite numbers, str keys); tuples become lists, Paths strings."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _not_finite(where, value)
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [check_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ResultsError(f"{where}: key {k!r} is not a string", _fix(where))
            out[k] = check_json(v, f"{where}.{k}")
        return out
    raise ResultsError(f"{where}: {type(value).__name__} is not JSON data", _fix(where))


def loads_strict(text: str, *, where: str) -> Any:
    """Parse JSON text, refusing NaN / Infinity (Python's json accepts them; strict parsers do not)."""

    def refuse(token: str) -> Any:
        raise ResultsError(f"{where}: {token} is not strict JSON", _fix(where))

    try:
        return json.loads(text, parse_constant=refuse)
    except json.JSONDecodeError as exc:
        raise ResultsError(
            f"{where}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})",
            "re-run the command that wrote it (the file may have been cut off or edited by hand)",
        ) from None


def dumps_strict(obj: Any) -> str:
    """Indented strict JSON text (a NaN raises), newline-terminated."""
    return json.dumps(check_json(obj, "result"), indent=2, allow_nan=False) + "\n"


HEADER_STYLES = {  # how each generation of files spells its header
    "full": ("format", "version", "kind"),
    "schema_version": ("kind", "schema_version"),  # analyses before the common header (version 1)
    "format_version": ("format", "format_version"),  # cache manifests (version 1)
    "no-kind": ("format", "version"),  # saved heads and predictions (version 1)
}


def header_style(data: Mapping[str, Any]) -> str | None:
    """Which header a JSON object carries (HEADER_STYLES), or None when it has none."""
    if "format" in data and "version" in data:
        return "full" if "kind" in data else "no-kind"
    if "format" in data and "format_version" in data:
        return "format_version"
    if "kind" in data and "schema_version" in data:
        return "schema_version"
    return None


@dataclass(frozen=True, kw_only=True)
class Versioned(Model):
    """A result file: the header (`format`, `version`, `kind`) and the versions this vitprobe reads.

    Subclasses set FORMAT, KIND, FILE, VERSIONS (every version readers know), CURRENT (what writers write)
    and LEGACY (version -> header style of files written before the common header). A version whose
    meaning differs (block numbering) converts in `_read_body` / `_write_body`; the model itself always
    holds the current meaning (0-based blocks).
    """

    FORMAT: ClassVar[str] = ""
    KIND: ClassVar[str] = ""
    FILE: ClassVar[str | None] = None
    VERSIONS: ClassVar[tuple[int, ...]] = (1,)
    CURRENT: ClassVar[int] = 1
    LEGACY: ClassVar[dict[int, str]] = {}

    format: str
    version: int
    kind: str

    @classmethod
    def from_dict(cls: type[M], data: Any, *, where: str = "") -> M:
        where = where or (cls.FILE or cls.KIND)  # type: ignore[attr-defined]
        version = cls.check_header(data, where)  # type: ignore[attr-defined]
        style = cls.LEGACY.get(version, "full")  # type: ignore[attr-defined]
        body = cls._read_body(  # type: ignore[attr-defined]
            {k: v for k, v in data.items() if k not in HEADER_STYLES[style]}, version, where
        )
        values = cls._parse_fields(body, where, skip=("format", "version", "kind"))
        return cls(format=cls.FORMAT, version=version, kind=cls.KIND, **values)  # type: ignore[attr-defined]

    @classmethod
    def check_header(cls, data: Any, where: str) -> int:
        """The file's version, after checking it is this kind of file and a version this vitprobe knows."""
        if not isinstance(data, Mapping):
            raise ResultsError(f"{where}: expected a JSON object, found {_kind(data)}", _fix(where))
        style = header_style(data)
        if style is None:
            raise ResultsError(
                f"{where}: not a vitprobe {cls.KIND} file (no format/version header)",
                f"pass a {cls.FILE or cls.KIND} written by vitprobe",
            )
        fmt = data.get("format")
        kind = data.get("kind")
        if (fmt is not None and fmt != cls.FORMAT) or (kind is not None and kind != cls.KIND):
            raise ResultsError(
                f"{where}: a {fmt or kind!r} file, not {cls.FORMAT!r}",
                f"pass the {cls.FILE or cls.KIND} written by vitprobe",
            )
        version = data.get("version", data.get("format_version", data.get("schema_version")))
        if isinstance(version, bool) or not isinstance(version, int):
            raise ResultsError(f"{where}: version {version!r} is not an integer", _fix(where))
        if version not in cls.VERSIONS:
            known = ", ".join(map(str, cls.VERSIONS))
            newer = version > max(cls.VERSIONS)
            raise ResultsError(
                f"{where}: {cls.FORMAT} version {version} is not one this vitprobe reads (it reads {known})",
                "upgrade vitprobe to read it"
                if newer
                else "re-run the command that wrote it with this vitprobe version",
            )
        if cls.LEGACY.get(version, "full") != style:
            raise ResultsError(
                f"{where}: the header of {cls.FORMAT} version {version} is spelt "
                f"{list(HEADER_STYLES[cls.LEGACY.get(version, 'full')])}, "
                f"this file has {list(HEADER_STYLES[style])}",
                _fix(where),
            )
        return version

    @classmethod
    def _read_body(cls, body: dict[str, Any], version: int, where: str) -> dict[str, Any]:
        """The body of a `version` file in the current meaning (override where a version differs)."""
        return body

    def _write_body(self, body: dict[str, Any]) -> dict[str, Any]:
        """The current-meaning body back in the meaning of `self.version`."""
        return body

    def to_dict(self) -> dict[str, Any]:
        style = self.LEGACY.get(self.version, "full")
        header = {"format": self.format, "kind": self.kind}
        out = {k: header.get(k, self.version) for k in HEADER_STYLES[style]}  # the version keys: version
        out.update(self._write_body(self._dump_fields(skip=("format", "version", "kind"))))
        return out
