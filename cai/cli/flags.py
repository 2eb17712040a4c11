"""Command-line flags generated from stage settings (cai.stages.settings), in the style of TRL's
config-to-flags: every field that declares flags becomes a typer option with the field's default,
bounds and help, and the command receives the validated settings object instead."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Flags:
    """Which fields of `model` a command exposes, and under which flags."""

    model: type[BaseModel]
    only: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    rename: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    """field -> flags, replacing those the field declares (for fields that declare none, too)."""
    prefix: str = ""
    """Prepended to the long flags: `eval-` turns --samples into --eval-samples."""
    overrides: bool = False
    """Flags default to unset and only those given are passed on (to merge over a config file)."""
    help: Mapping[str, str] = field(default_factory=dict)
    """field -> help text, for models whose fields carry none."""

    def fields(self) -> list[tuple[str, FieldInfo, tuple[str, ...]]]:
        chosen = []
        for name, info in self.model.model_fields.items():
            if (self.only is not None and name not in self.only) or name in self.exclude:
                continue
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            flags = self.rename.get(name) or tuple(extra.get("flags", ()))  # type: ignore[arg-type]
            if not flags:
                continue
            if self.prefix:
                # Only the long flags, prefixed: a short one (-n) would clash with the command's own.
                flags = tuple(f"--{self.prefix}{f[2:]}" for f in flags if f.startswith("--"))
            chosen.append((name, info, flags))
        return chosen

    def flag_of(self, name: str) -> str:
        for field_name, _, flags in self.fields():
            if field_name == name:
                return flags[0].split("/")[0]
        return name


def _bounds(info: FieldInfo) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    for constraint in info.metadata:
        for attr, key in (("ge", "min"), ("gt", "min"), ("le", "max"), ("lt", "max")):
            value = getattr(constraint, attr, None)
            if value is not None:
                bounds[key] = value
    return bounds


def _parameter(
    param_name: str, info: FieldInfo, flags: tuple[str, ...], overrides: bool, help_text: str | None
) -> inspect.Parameter:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    required = info.is_required() and not overrides
    default: Any = ... if required else (None if overrides else info.get_default(call_default_factory=True))
    annotation: Any = info.annotation
    if overrides:
        annotation = annotation | None
    option = typer.Option(
        default,
        *flags,
        help=help_text or info.description or None,
        envvar=str(extra["envvar"]) if "envvar" in extra else None,
        show_default=not overrides and not required,
        **_bounds(info),
    )
    return inspect.Parameter(
        param_name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation
    )


def with_settings(**groups: Flags) -> Callable[[F], F]:
    """Give a typer command the flags of each settings group; the command is called with each
    group's values as one keyword argument (a validated model, or with `overrides` a dict of
    the flags given). Invalid values raise BadInput naming the flag (exit 2)."""

    def decorate(command: F) -> F:
        signature = inspect.signature(command)
        kept = [p for p in signature.parameters.values() if p.name not in groups]
        generated: list[inspect.Parameter] = []
        where: dict[str, tuple[str, str]] = {}
        for group_name, flags in groups.items():
            for name, info, names in flags.fields():
                param_name = f"{group_name}__{name}"
                where[param_name] = (group_name, name)
                generated.append(_parameter(param_name, info, names, flags.overrides, flags.help.get(name)))

        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values: dict[str, dict[str, Any]] = {name: {} for name in groups}
            for param_name in list(kwargs):
                if param_name in where:
                    group_name, name = where[param_name]
                    values[group_name][name] = kwargs.pop(param_name)
            for group_name, flags in groups.items():
                given = values[group_name]
                if flags.overrides:
                    kwargs[group_name] = {k: v for k, v in given.items() if v is not None and v != []}
                else:
                    kwargs[group_name] = build(flags, given)
            return command(*args, **kwargs)

        # Generated options go before the command's own trailing ones (--json) in --help.
        position = next((i for i, p in enumerate(kept) if p.name == "as_json"), len(kept))
        params = [*kept[:position], *generated, *kept[position:]]
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) if p.name != "ctx" else p for p in params]
        wrapper.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def build(flags: Flags, values: Mapping[str, Any]) -> Any:
    """The settings model from flag values; a validation error becomes BadInput naming flags."""
    try:
        return flags.model(**values)
    except ValidationError as exc:
        raise bad_input(exc, flags) from None


def bad_input(exc: ValidationError, flags: Flags) -> Exception:
    """A pydantic error as BadInput: one line per problem, each naming the flag it is about."""
    from cai.errors import BadInput
    from cai.stages.settings import validation_problems

    problems = validation_problems(exc, flags.flag_of)
    return BadInput("; ".join(problems), problems)
