"""Generate argparse flags from a frozen config dataclass, and back.

Every field becomes ``--field-name``; its help is the field's ``help``
metadata plus its default, so ``--help`` is complete by construction and the
CLI cannot drift from the Python API. A help text that already says what the
default is ("default: ...", "default ...") is shown as it is, so a default is
never given twice.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def _base_type(tp):
    """(python type, optional?) of an annotation like ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return tp, False


def _with_default(help_: str, shown: str) -> str:
    """``help_`` plus "(shown)", unless the help already states its default (or there is none to show)."""
    if "default" in help_.lower() and shown.startswith("default"):
        return help_
    return f"{help_} ({shown})"


def add_config_args(parser: argparse.ArgumentParser, cls, skip: tuple = ()) -> None:
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(f"{cls.__name__} settings")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                               help=_with_default(help_, f"default: {f.default}"))
            continue
        if tp in (tuple, list) or typing.get_origin(tp) in (tuple, list):
            inner = (typing.get_args(tp) or (str,))[0]
            group.add_argument(flag, type=inner, nargs="+", default=None if required else f.default,
                               required=required, help=_with_default(help_, f"default: {f.default}"))
            continue
        default = None if required else f.default
        shown = "required" if required else f"default: {default}"
        # Choices are validated by the config itself (one message, one place), so
        # they are only shown here, not enforced by argparse.
        choices = f.metadata.get("choices")
        metavar = "{" + ",".join(choices) + "}" if choices else f.name.upper()
        group.add_argument(flag, type=tp if tp in (int, float, str) else str, default=default,
                           required=required, metavar=metavar, help=_with_default(help_, shown))


def config_from_args(cls, ns: argparse.Namespace, **extra):
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(ns, f.name):
            v = getattr(ns, f.name)
            if isinstance(v, list):
                v = tuple(v)
            values[f.name] = v
    values.update(extra)
    return cls(**values)


def as_config(cls, value, verb: str):
    """``value`` as a ``cls`` config: an instance as it is, a dict as ``cls(**value)``; anything else is a
    TypeError naming the config class. Every public verb calls this, so the API takes what the CLI builds.

    Unknown keys are refused with the fields the class has (a UsageError, like any bad setting).
    """
    from .errors import UsageError, suggest
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in value if k not in names]
        if unknown:
            raise UsageError(f"{cls.__name__} has no setting {unknown[0]!r}", value=unknown,
                             allowed=", ".join(names), fix=suggest(str(unknown[0]), names) or
                             f"see help({cls.__name__})")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in value
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise UsageError(f"{verb} needs {', '.join(missing)} in its {cls.__name__}", value=value,
                             allowed=f"{cls.__name__}({', '.join(f'{m}=...' for m in missing)}, ...)",
                             fix=f"add {missing[0]!r} to the dict")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
    raise TypeError(f"{verb}() takes its settings as a {cls.__name__} (or a dict of its fields), "
                    f"not {type(value).__name__}")
