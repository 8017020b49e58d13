"""Validation shared by the pipeline's and the operations' schemas: YAML in, one line out.

A bad key or value stops a command or stage with exit code 2 and a line that names the key,
the value and what is allowed (ConfigError, rendered by imgclf.errors).
"""

import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from imgclf.errors import ConfigError

Schema = TypeVar("Schema", bound=BaseModel)


def validate_against(schema: type[Schema], raw: Any) -> Schema:
    """Validate a plain dict against `schema`; raise ConfigError naming the first bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the configuration must be a mapping, got {type(raw).__name__}")
    try:
        return schema.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(describe(error, schema)) from None


def read_yaml(path: str | os.PathLike) -> Any:
    """params.yaml's contents; a missing or unreadable file is a ConfigError."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: run `imgclf params` to compose it") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}".replace("\n", " ")) from None


def describe(error: ValidationError, root: type[BaseModel]) -> str:
    """One line for the first schema error: the dotted key, the bad value, what is allowed."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"]]
    section, parent, path = root, None, []
    for part in loc:
        before = section
        section, skipped = _descend(section, part)
        # Inside a plain union (`int | Literal["auto"]`) pydantic adds one loc part per member.
        skipped = skipped or (
            before is not None
            and not _is_section(before)
            and not part.isdigit()
            and not _union_members(before)
        )
        if not skipped:
            path.append(part)
            parent = before
    key = ".".join(path)
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    if first["type"] == "extra_forbidden":
        allowed = ", ".join(parent.model_fields) if _is_section(parent) else "none"
        return f"unknown key '{key}'; allowed here: {allowed}{more}"
    if first["type"] == "union_tag_invalid":
        expected = first["ctx"]["expected_tags"]
        return f"{key}.name={first['ctx']['tag']!r}: unknown choice; allowed: {expected}{more}"
    if first["type"] == "missing":
        return f"missing key '{key}'{more}"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and isinstance(first.get("input"), dict):
        return f"{message}{more}"  # a check across keys (a model validator) names them itself
    return f"{key}={first.get('input')!r}: {message}{more}"


def _is_section(node: Any) -> bool:
    return isinstance(node, type) and issubclass(node, BaseModel)


def _descend(section: Any, part: str) -> tuple[Any, bool]:
    """Step from a schema node into `part`; report whether `part` was a union tag, not a key."""
    if _is_section(section):
        field = section.model_fields.get(part)
        return (field.annotation if field else None), False
    for member in _union_members(section):
        if part in typing.get_args(member.model_fields["name"].annotation):
            return member, True
    return None, False


def _union_members(annotation: Any) -> list[type[BaseModel]]:
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Annotated:
        return _union_members(args[0])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
    return []
