"""The search space: knobs read from `conf/search_space.yaml`, checked before any work.

The file holds one mapping per objective (`marl`, `twin`); each knob maps an Optuna
parameter name to a dotted config key with a type and a range (see the file's header). A
knob is checked against the typed config itself: its key must name a leaf of `Config`, and
both ends of its range (every choice of a categorical knob) must pass the config's own
validation, so a study never starts with a range that some trial could not run.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dntsync.config import Config, ConfigError, TuneConfig, from_dict, merge, read_yaml_file, to_plain

KNOB_FIELDS = {"key", "type", "low", "high", "log", "step", "choices"}
OBJECTIVE_NAMES = typing.get_args(typing.get_type_hints(TuneConfig)["objective"])


@dataclass(frozen=True)
class Knob:
    """One sampled hyper-parameter: Optuna name `name`, written to config key `key`."""

    name: str
    key: str
    type: Literal["float", "int", "categorical"]
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        """Draw this knob's value for an Optuna trial."""
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log,
                                     step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def describe(self) -> dict:
        """A plain description (stored with the study to refuse a changed space on resume)."""
        if self.type == "categorical":
            return {"key": self.key, "type": self.type, "choices": list(self.choices)}
        plain = {"key": self.key, "type": self.type, "low": self.low, "high": self.high}
        if self.log:
            plain["log"] = True
        if self.step is not None:
            plain["step"] = self.step
        return plain


def nested(values: dict[str, Any]) -> dict:
    """`{"marl.algorithm.gamma": 0.3}` -> `{"marl": {"algorithm": {"gamma": 0.3}}}` (a config overlay)."""
    tree: dict = {}
    for dotted, value in values.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def apply_values(cfg: Config, values: dict[str, Any]) -> Config:
    """`cfg` with dotted keys set to `values`, validated like a loaded config."""
    return from_dict(merge(to_plain(cfg), nested(values)))


def _leaf_hint(key: str) -> Any:
    """The type hint of config leaf `key`; a clear error when `key` is not a leaf of Config."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name for f in dataclasses.fields(cls)}
        if part not in fields:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {key!r}: {where} has no {part!r} "
                              f"(allowed: {sorted(fields)})")
        hint = typing.get_type_hints(cls)[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(hint):
                raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i + 1])} "
                                  f"is not a section")
            cls = hint
        elif dataclasses.is_dataclass(hint):
            raise ConfigError(f"config key {key!r} is a whole section; name one of its keys")
    return hint


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _parse_knob(name: str, spec: Any, where: str) -> Knob:
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: need a mapping with key, type and a range, got {spec!r}")
    unknown = sorted(set(spec) - KNOB_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(KNOB_FIELDS)}")
    key = spec.get("key")
    if not isinstance(key, str) or not key:
        raise ConfigError(f"{where}: need `key`, the dotted config key the knob sets")
    kind = spec.get("type")
    if kind not in ("float", "int", "categorical"):
        raise ConfigError(f"{where}: type = {kind!r}; need float, int or categorical")
    if kind == "categorical":
        extra = sorted({"low", "high", "log", "step"} & set(spec))
        if extra:
            raise ConfigError(f"{where}: a categorical knob takes `choices`, not {extra}")
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{where}: need a non-empty list `choices`")
        if not all(c is None or isinstance(c, (bool, int, float, str)) for c in choices):
            raise ConfigError(f"{where}: choices must be numbers, strings, booleans or null")
        return Knob(name, key, "categorical", choices=tuple(choices))
    low, high, step, log = spec.get("low"), spec.get("high"), spec.get("step"), spec.get("log", False)
    if "choices" in spec:
        raise ConfigError(f"{where}: `choices` is for categorical knobs; a {kind} knob takes "
                          f"low and high")
    for label, value in (("low", low), ("high", high)):
        if not _is_number(value) or (kind == "int" and not isinstance(value, int)):
            raise ConfigError(f"{where}: {label} = {value!r}; need {'an integer' if kind == 'int' else 'a finite number'}")
    if low > high:
        raise ConfigError(f"{where}: low = {low!r} > high = {high!r}")
    if not isinstance(log, bool):
        raise ConfigError(f"{where}: log = {log!r}; need true or false")
    if log and low <= 0:
        raise ConfigError(f"{where}: log scale needs low > 0, got low = {low!r}")
    if step is not None:
        if log:
            raise ConfigError(f"{where}: `step` cannot be combined with a log scale")
        if not _is_number(step) or step <= 0 or (kind == "int" and not isinstance(step, int)):
            raise ConfigError(f"{where}: step = {step!r}; need a positive "
                              f"{'integer' if kind == 'int' else 'number'}")
    return Knob(name, key, kind, low=low, high=high, log=log, step=step)


def _check_against_config(knob: Knob, cfg: Config, where: str) -> None:
    hint = _leaf_hint(knob.key)
    if knob.type == "float" and hint is int:
        raise ConfigError(f"{where}: {knob.key} is an integer; make the knob type int")
    ends = knob.choices if knob.type == "categorical" else (knob.low, knob.high)
    for value in ends:
        try:
            apply_values(cfg, {knob.key: value})
        except ConfigError as err:
            raise ConfigError(f"{where}: the value {value!r} fails the config check: {err}") from None


def parse_space(data: Any, cfg: Config, source: str = "search space") -> dict[str, tuple[Knob, ...]]:
    """Every objective's knobs from the file's mapping; any error names file, objective and knob."""
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{source}: need a mapping objective -> knobs "
                          f"(objectives: {list(OBJECTIVE_NAMES)})")
    spaces: dict[str, tuple[Knob, ...]] = {}
    for objective, knobs in data.items():
        if objective not in OBJECTIVE_NAMES:
            raise ConfigError(f"{source}: unknown objective {objective!r}; "
                              f"allowed: {list(OBJECTIVE_NAMES)}")
        if not isinstance(knobs, dict) or not knobs:
            raise ConfigError(f"{source}: {objective}: need a mapping knob name -> spec")
        parsed = []
        for name, spec in knobs.items():
            where = f"{source}: {objective}.{name}"
            knob = _parse_knob(str(name), spec, where)
            try:
                _check_against_config(knob, cfg, where)
            except ConfigError as err:
                msg = str(err)
                raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
            parsed.append(knob)
        keys = [k.key for k in parsed]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ConfigError(f"{source}: {objective}: config key(s) {dupes} set by two knobs")
        spaces[objective] = tuple(parsed)
    return spaces


def load_space(path: str | Path, cfg: Config, objective: str) -> tuple[Knob, ...]:
    """The knobs of `objective` in the space file at `path`; the whole file is checked."""
    path = Path(path)
    data = read_yaml_file(path, "search space file (tune.search_space)")
    spaces = parse_space(data, cfg, str(path))
    if objective not in spaces:
        raise ConfigError(f"{path}: no knobs for objective {objective!r} "
                          f"(it has {sorted(spaces)})")
    return spaces[objective]
