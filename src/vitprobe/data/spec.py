"""Dataset spec strings: `KIND:PATH[?key=value&...]` parsed into a `Spec`, parameters checked per kind.

Nothing here opens a dataset; `vitprobe.data.kinds` declares which parameters each kind takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl

from vitprobe.errors import DatasetError


@dataclass(frozen=True)
class Param:
    """One `?key=value` parameter a dataset kind accepts.

    Attributes:
        name: the key.
        help: one line for docs and `vitprobe data kinds`.
        default: the value when the spec does not give one (None: absent unless given).
        choices: allowed values of a text parameter; empty for an integer parameter.
        low, high: inclusive range of an integer parameter (None: unbounded on that side).
    """

    name: str
    help: str
    default: int | str | None = None
    choices: tuple[str, ...] = ()
    low: int | None = None
    high: int | None = None

    def parse(self, spec: str, value: str) -> int | str:
        """The value of `key=value` in `spec`, checked; a bad one is a `DatasetError` naming the spec."""
        if self.choices:
            if value not in self.choices:
                raise DatasetError(
                    f"{spec}: {self.name}={value!r} is not one of {', '.join(self.choices)}",
                    f"e.g. {self.name}={self.choices[0]}",
                )
            return value
        try:
            number = int(value)
        except ValueError as exc:
            raise DatasetError(f"{spec}: {self.name}={value!r} is not an integer", self.range_text()) from exc
        if (self.low is not None and number < self.low) or (self.high is not None and number > self.high):
            raise DatasetError(f"{spec}: {self.name}={number} is out of range", self.range_text())
        return number

    def range_text(self) -> str:
        """How to write a valid value, e.g. `use 1 <= partition <= 10`."""
        if self.choices:
            return f"use {self.name}={' or '.join(self.choices)}"
        low = "" if self.low is None else f"{self.low} <= "
        high = "" if self.high is None else f" <= {self.high}"
        return f"use {low}{self.name}{high} (an integer)"


@dataclass(frozen=True)
class Spec:
    """A parsed dataset spec.

    Attributes:
        text: the spec as the user wrote it (used in every message).
        kind: the part before the first `:`.
        path: the part after it, before `?` (a folder, a file, or `needles` for synthetic).
        params: every parameter of the kind: the given values, else the defaults (None when absent).
    """

    text: str
    kind: str
    path: str
    params: Mapping[str, int | str | None] = field(default_factory=dict)

    def __getitem__(self, name: str) -> int | str | None:
        return self.params[name]


def split_kind(text: str, kinds: Mapping[str, object]) -> tuple[str, str]:
    """`KIND:REST` -> (KIND, REST), with KIND checked against `kinds` and REST non-empty."""
    kind, sep, rest = text.partition(":")
    if not sep or kind not in kinds:
        raise DatasetError(
            f"unknown dataset spec {text!r}: expected KIND:PATH with KIND one of {', '.join(kinds)}",
            "e.g. --data imagefolder:/data/flowers, cub:/data/CUB_200_2011, dtd:/data?partition=1 or "
            "synthetic:needles (`vitprobe data kinds` lists them all)",
        )
    if not rest:
        raise DatasetError(f"dataset spec {text!r} has no path after {kind}:", f"write {kind}:PATH")
    return kind, rest


def parse(text: str, kinds: Mapping[str, tuple[Param, ...]]) -> Spec:
    """Parse `KIND:PATH[?key=value&...]`.

    The query is split off at the first `?`, unless the whole of PATH names an existing file or folder (a
    path that itself holds a `?`). Parameters the kind does not take, repeated keys and bad values are
    `DatasetError`s naming the spec.

    Args:
        text: the spec.
        kinds: for each kind name, the parameters it accepts.
    """
    kind, rest = split_kind(text, kinds)
    path, sep, query = rest.partition("?")
    if sep and Path(rest).expanduser().exists():
        path, query = rest, ""
    if not path:
        raise DatasetError(f"dataset spec {text!r} has no path before '?'", f"write {kind}:PATH?{query}")
    declared = {p.name: p for p in kinds[kind]}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError as exc:
        raise DatasetError(
            f"{text}: cannot read the parameters {query!r}", "write ?key=value&key=value"
        ) from exc
    given: dict[str, int | str] = {}
    for key, value in pairs:
        if key not in declared:
            allowed = ", ".join(declared) if declared else f"none: {kind} takes no parameters"
            raise DatasetError(
                f"{text}: unknown parameter {key!r} (parameters: {allowed})", _usage(kind, declared)
            )
        if key in given:
            raise DatasetError(f"{text}: parameter {key!r} is given twice", "give each parameter once")
        given[key] = declared[key].parse(text, value)
    params = {name: given.get(name, p.default) for name, p in declared.items()}
    return Spec(text=text, kind=kind, path=path, params=params)


def _usage(kind: str, declared: Mapping[str, Param]) -> str:
    if not declared:
        return f"write {kind}:PATH without '?'"
    return f"e.g. {kind}:PATH?" + "&".join(
        f"{name}={p.default if p.default is not None else (p.choices[0] if p.choices else p.low or 0)}"
        for name, p in declared.items()
    )
