"""One declaration per option: what the render and training settings are built on.

An option is one field of a flat pydantic model (`RenderConfig`, `TrainConfig`):

    steps: int = option(40, "denoising steps (paper: 40)", ge=1, le=1000, pixels=True)

and everything else is generated from that line:

- the flag `--steps` (`add_flags`: argparse type or choices, help = the description and the
  default, `--no-x` for an option on by default, repeatable for a list);
- the YAML key `steps` (`-` or `_`; `jobs.cli.merge_options` takes the model's field names);
- the checks, at construction: the type (strict: YAML `steps: twenty` or `force: 'yes'` is
  refused, not coerced; a whole number passes as a float), the range and the choices, each
  failing as one `ConfigError` line that names the value (the jobs exit 2 on it);
- `default(Model, name)` and `bounds(Model, name)` for the stage configs and Serve's limits;
- the docs' table of options (`table`, written into docs/options.md by `pipeline.options_page`);
- membership of the digests: `pixels=True` or `"unless_default"` (the render settings digest, `RenderConfig.settings`),
  `recipe=True` (the training recipe digest, `TrainConfig.recipe`).

Checks across fields (`--select clip` needs `--clip-model`) stay in each model's `check()`
(not `validate`, which would shadow pydantic's deprecated classmethod).
Driver-side: pydantic only.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "ConfigError",
    "Options",
    "option",
    "add_flags",
    "default",
    "bounds",
    "marked",
    "digest_values",
    "flag_name",
    "table",
]

BOUND_KEYS = ("ge", "gt", "le", "lt")
RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


class ConfigError(ValueError):
    """A bad setting: the message names it and the value received."""


def option(
    default: Any,
    help: str,
    *,
    flag: bool | str = True,
    pixels: bool | Literal["unless_default"] = False,
    recipe: bool = False,
    metavar: str | None = None,
    **checks: Any,
) -> Any:
    """A field of an `Options` model. `help` is the flag's help and the docs' line; `checks`
    are pydantic's `ge`/`gt`/`le`/`lt`; `flag=False`: YAML only (mappings; chaos tests),
    `flag="backfill"`: a flag of jobs.backfill only; `pixels`: the value changes the rendered
    image (it enters the settings digest; `"unless_default"`: only when it is not the default,
    for an option added later whose default renders what every catalog before it did, so their
    digests still match); `recipe`: it changes the weights a training computes."""
    extra = {"flag": flag, "pixels": pixels, "recipe": recipe, "metavar": metavar}
    if isinstance(default, list | dict):
        return Field(
            default_factory=lambda: type(default)(default), description=help, json_schema_extra=extra, **checks
        )
    return Field(default, description=help, json_schema_extra=extra, **checks)


class Options(BaseModel):
    """A flat settings model whose fields are `option(...)`s. Construction checks every field
    and raises `ConfigError` with one line naming the first bad value."""

    model_config = ConfigDict(extra="forbid", strict=True)

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise ConfigError(_one_line(type(self), e.errors()[0], values)) from None

    @classmethod
    def keys(cls) -> set[str]:
        return set(cls.model_fields)


def marked(model: type[Options], mark: str) -> tuple[str, ...]:
    """The fields declared with `mark=True` (`pixels`, `recipe`), in declaration order."""
    return tuple(name for name, field in model.model_fields.items() if _extra(field)[mark])


def digest_values(config: Options, mark: str) -> dict[str, Any]:
    """The values of the fields declared `mark` (`pixels`, `recipe`), leaving out a field
    declared `mark="unless_default"` while it holds its default."""
    model = type(config)
    return {
        name: getattr(config, name)
        for name in marked(model, mark)
        if not (
            _extra(model.model_fields[name])[mark] == "unless_default"
            and getattr(config, name) == default(model, name)
        )
    }


def default(model: type[BaseModel], name: str) -> Any:
    return model.model_fields[name].get_default(call_default_factory=True)


def bounds(model: type[BaseModel], name: str) -> dict[str, Any]:
    """The declared range of a field as `Field` keywords (`{"ge": 1, "le": 16}`)."""
    found = {}
    for check in model.model_fields[name].metadata:
        found |= {key: getattr(check, key) for key in BOUND_KEYS if getattr(check, key, None) is not None}
    return found


def flag_name(model: type[Options], name: str) -> str:
    """How a message names a field: its flag, or its YAML key when it has no flag."""
    return f"--{name.replace('_', '-')}" if _extra(model.model_fields[name])["flag"] else name


def add_flags(parser: argparse.ArgumentParser, model: type[Options], which: bool | str = True) -> None:
    """One flag per field declared with `flag=which`, in declaration order. Give the parser
    `argument_default=argparse.SUPPRESS`: only the flags given reach the config, so the YAML
    and the model's defaults fill the rest."""
    for name, field in model.model_fields.items():
        extra = _extra(field)
        if extra["flag"] != which:
            continue
        flag, kind = f"--{name.replace('_', '-')}", _without_none(field.annotation)
        value = field.get_default(call_default_factory=True)
        shown = "" if _no_default(value) else f" (default {_show(value)})"
        help_text = (field.description + shown).replace("%", "%%")
        if kind is bool and value:
            turn_off = f"turn off (on by default): {field.description}".replace("%", "%%")
            parser.add_argument(f"--no-{flag[2:]}", dest=name, action="store_false", help=turn_off)
        elif kind is bool:
            parser.add_argument(flag, action="store_true", help=help_text)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, action="append", type=typing.get_args(kind)[0], help=help_text + " (repeatable)")
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, choices=typing.get_args(kind), help=help_text)
        else:
            parser.add_argument(
                flag, type=kind if kind in (int, float) else str, metavar=extra["metavar"], help=help_text
            )


def table(model: type[Options], digest: str) -> str:
    """The model's options as a Markdown table: flag, YAML key, type, default, range or choices,
    whether it enters the `digest` mark's digest, and the help."""
    lines = [
        "| flag | YAML key | type | default | range | " + digest + " | what it does |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, field in model.model_fields.items():
        extra, kind = _extra(field), _without_none(field.annotation)
        value = field.get_default(call_default_factory=True)
        dashed = name.replace("_", "-")
        flag = {True: f"`--{'no-' if kind is bool and value else ''}{dashed}`", False: "YAML only"}.get(
            extra["flag"], f"`--{dashed}` (jobs.{extra['flag']})"
        )
        if typing.get_origin(kind) is Literal:
            kind_text, limits = "str", " | ".join(typing.get_args(kind))
        else:
            kind_text, limits = _type_name(field.annotation), _range(bounds(model, name))
        shown = "" if value in (None, "") else f"`{_show(value)}`"
        member = {True: "yes", False: "", "unless_default": "yes, unless default"}[extra[digest]]
        cells = [flag, f"`{name}`", kind_text, shown, limits, member, field.description]
        lines.append("| " + " | ".join(cell.replace("|", "\\|").replace("<", "&lt;") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _extra(field) -> dict:
    return field.json_schema_extra or {"flag": True, "pixels": False, "recipe": False, "metavar": None}


def _without_none(annotation):
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kept = [a for a in typing.get_args(annotation) if a is not type(None)]
        return kept[0] if len(kept) == 1 else annotation
    return annotation


def _no_default(value) -> bool:
    """No default worth showing: none, off, empty. `is`, not `in`: 0 == False, and 0 is a default."""
    return value is None or value is False or (isinstance(value, str | list) and not value)


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _type_name(annotation) -> str:
    return str(annotation).replace("typing.", "") if typing.get_args(annotation) else annotation.__name__


def _one_line(model: type[Options], error: dict, values: dict) -> str:
    """pydantic's first error as the jobs' one line: `steps must be int, got str 'twenty'`,
    `--steps must be in 1..1000, got 0`, `--scheduler must be one of ('ddim', 'dpmpp'), got 'x'`."""
    name = str(error["loc"][0]) if error["loc"] else ""
    if name not in model.model_fields:
        if error["type"] == "extra_forbidden":
            return f"unknown option {name!r} (see --help)"
        return error["msg"]
    field, value = model.model_fields[name], values.get(name)
    kind = _without_none(field.annotation)
    if error["type"] == "value_error":  # a field's own validator wrote the message
        return str(error["ctx"]["error"])
    if error["type"] in RANGE_ERRORS:
        return f"{flag_name(model, name)} must be {_range(bounds(model, name))}, got {value!r}"
    if typing.get_origin(kind) is Literal:
        return f"{flag_name(model, name)} must be one of {typing.get_args(kind)}, got {value!r}"
    return f"{name} must be {_type_name(field.annotation)}, got {type(value).__name__} {value!r}"


def _range(found: dict) -> str:
    if not found:
        return ""
    low = found.get("ge", found.get("gt"))
    high = found.get("le", found.get("lt"))
    if low is not None and high is not None:
        if "ge" in found and "le" in found:
            return f"in {low}..{high}"
        return f"in {'[' if 'ge' in found else '('}{low}, {high}{']' if 'le' in found else ')'}"
    if low is not None:
        return f"{'>=' if 'ge' in found else '>'} {low}"
    return f"{'<=' if 'le' in found else '<'} {high}"
