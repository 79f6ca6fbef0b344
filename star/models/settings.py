"""Model configurations as flat settings: what ``create_model(name, **overrides)`` and the
training config's ``model.*`` keys accept.

A model family's configuration is a frozen dataclass (``StarPretrainConfig``, which nests a
``PackingConfig``, and ``StarClassifierConfig``). Its settings are the dataclass's fields with
nested dataclasses flattened one level (``sep_type`` is ``packing.sep_type``); an override
replaces settings through ``dataclasses.replace``, so the dataclasses' own checks run again.
A string setting with a fixed set of values declares them once, with :func:`choice_field`.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Any


def choice_field(default: str, choices: tuple[str, ...]) -> Any:
    """A dataclass field whose value must be one of ``choices`` (checked by :func:`check_choices`)."""
    return dataclasses.field(default=default, metadata={"choices": choices})


def check_choices(config: Any) -> None:
    """Raise a ValueError naming the setting for a value outside its declared choices."""
    for f in dataclasses.fields(config):
        allowed = f.metadata.get("choices")
        value = getattr(config, f.name)
        if allowed is not None and value not in allowed:
            raise ValueError(f"{f.name}={value!r} is not one of {', '.join(allowed)}")


@dataclass(frozen=True)
class Setting:
    """One overridable setting: its flat ``name``, type, default and allowed values (or None)."""

    name: str
    type: Any
    default: Any
    choices: tuple[str, ...] | None
    section: str | None  # the nested dataclass field holding it (``packing``), or None


def settings(config_class: type) -> dict[str, Setting]:
    """The flat settings of a configuration dataclass, in field order."""
    out: dict[str, Setting] = {}
    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            for name, inner in settings(tp).items():
                out[name] = dataclasses.replace(inner, section=f.name)
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[f.name] = Setting(f.name, tp, default, f.metadata.get("choices"), None)
    return out


def flat_values(config: Any) -> dict[str, Any]:
    """``{setting: value}`` of a configuration instance (nested sections flattened)."""
    return {name: getattr(getattr(config, s.section) if s.section else config, name)
            for name, s in settings(type(config)).items()}


def apply_overrides(config: Any, overrides: dict[str, Any], owner: str = "") -> Any:
    """``config`` with flat ``overrides`` applied through ``dataclasses.replace``.

    An unknown name is a ValueError that names the closest setting; invalid values raise the
    dataclasses' own ValueErrors."""
    known = settings(type(config))
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        owner = owner or type(config).__name__
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
        raise ValueError(f"{owner} does not take {', '.join(hints)}; it accepts: {', '.join(known)}")
    top = {name: value for name, value in overrides.items() if known[name].section is None}
    sections: dict[str, dict[str, Any]] = {}
    for name, value in overrides.items():
        if known[name].section is not None:
            sections.setdefault(known[name].section, {})[name] = value
    for section, values in sections.items():
        top[section] = dataclasses.replace(getattr(config, section), **values)
    return dataclasses.replace(config, **top)
