"""Command-line options generated from config dataclasses, as vLLM's `EngineArgs`: every default lives in its
dataclass, and each field `foo_bar` becomes `--foo-bar`.

The fields declared with `option(...)` are the options, their help, choices and the like in the field's metadata;
the annotation gives the type (`X | None` as X, `bool` as a switch, `dict` as a JSON object, `list[int]` as
comma-separated integers). A field holding a nested config dataclass (`field(default_factory=SomeConfig)`) is built
by `config_from_args` from that dataclass's own options. A subclass changes an option's default with a plain
`name: type = value`: the option stays, with its help.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

Config = TypeVar("Config")
OPTION = "leapserve_option"  # the metadata key that marks a field as a command-line option
ArgumentContainer = argparse.ArgumentParser | argparse._ArgumentGroup


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in its help, unless there is none to show (None, or a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def option(default: Any = dataclasses.MISSING, help: str | None = None, **metadata: Any) -> Any:
    """A dataclass field that is also a command-line option; `metadata` (choices, type, metavar) goes to
    `add_argument`. A dict or list default is copied for every instance."""
    metadata = {OPTION: True, "help": help, **metadata}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def json_object(text: str) -> dict:
    """argparse type: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object ({{...}}), got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated integers, e.g. `0,15,29`."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,15,29; got {text!r}")
    return values


def _nested_config(f: dataclasses.Field) -> type | None:
    """The config dataclass a field holds (`field(default_factory=SomeConfig)`), else None."""
    factory = f.default_factory
    return factory if isinstance(factory, type) and dataclasses.is_dataclass(factory) else None


def _option_metadata(cls: type, name: str) -> Mapping[str, Any] | None:
    """The `option(...)` metadata of field `name`, looked up through the base classes; None if it is no option."""
    for klass in cls.__mro__:
        f = getattr(klass, "__dataclass_fields__", {}).get(name)
        if f is not None and OPTION in f.metadata:
            return f.metadata
    return None


def _default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _type_kwargs(annotation: Any, default: Any) -> dict[str, Any]:
    """`add_argument` keywords for a field annotation (`X | None` read as X)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = members[0] if len(members) == 1 else annotation
    if annotation is bool:
        return {"action": "store_true"} if default is False else {"action": argparse.BooleanOptionalAction}
    if annotation in (int, float, str):
        return {"type": annotation}
    if annotation is dict or typing.get_origin(annotation) is dict:
        return {"type": json_object, "metavar": "JSON"}
    if annotation == list[int]:
        return {"type": int_list, "metavar": "N,N,..."}
    raise TypeError(f"no command-line type for {annotation!r}: give option(..., type=...) or use field()")


def add_config_arguments(
    parser: ArgumentContainer,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> None:
    """Add `--field-name` to `parser` (a parser or an argument group) for each option field of the dataclass `cls`
    (`only` these, if given), in field order; `overrides` maps a field to `add_argument` keywords that replace the
    generated ones (say, choices known only at run time, or a command's own help)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = _option_metadata(cls, f.name)
        if meta is None or (only is not None and f.name not in only):
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else _default(f)
        # a required option's default is suppressed: nothing to show in --help
        kwargs = {
            **_type_kwargs(hints[f.name], default),
            **({"required": True, "default": argparse.SUPPRESS} if required else {"default": default}),
        }
        kwargs.update((k, v) for k, v in meta.items() if k != OPTION)
        kwargs.update((overrides or {}).get(f.name, {}))
        parser.add_argument(f"--{f.name.replace('_', '-')}", **kwargs)


def config_from_args(cls: type[Config], args: argparse.Namespace, **values: Any) -> Config:
    """`cls` from the parsed options named like its fields, nested config dataclasses built the same way; fields
    without an option keep their defaults and `values` replace the options."""
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # a TypeVar cannot be bound to "a dataclass"
        nested = _nested_config(f)
        if nested is not None:
            kwargs[f.name] = config_from_args(nested, args)
        elif hasattr(args, f.name) and _option_metadata(cls, f.name) is not None:
            kwargs[f.name] = getattr(args, f.name)
    return cls(**{**kwargs, **values})
