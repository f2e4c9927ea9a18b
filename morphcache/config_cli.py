"""Command-line options generated from a pydantic model, plus ``--config FILE``: one definition per option.

As timm's ``--config`` and DINOv2's merged configs do, a command's options come from its config model
(:class:`~morphcache.schemas.RunConfig` for ``train``): each field becomes ``--field-name`` with the field's
description as help and its default shown; ``--config run.yaml`` (YAML or JSON, e.g. a run directory's
``config.json``) sets any field, and flags given explicitly override the file. The merged values are validated by
the model, and an invalid file or value is one line naming the field, the value and what is allowed
(:class:`~morphcache.errors.ConfigError`, exit 2). A field whose command-line form differs from its type says so
with ``Field(json_schema_extra={"cli_type": "str"})`` (e.g. ``--shard I/N`` for a ``(I, N)`` tuple, parsed by the
model's validator); ``{"cli_flags": "--projected/--unprojected"}`` names a boolean's two flags, and a list
(``["--checkpoint", "-c"]``) gives an option several spellings. ``{"cli_registry": "datasets"}`` appends the names
registered in that :mod:`morphcache.registries` registry to the help text (import the module that registers the
built-ins before the command is decorated).

    @options_from_model(RunConfig, exclude={"schema_version"})
    def train_command(values: dict, out: Annotated[Path, typer.Option()], ...) -> int:
        config = validate_config(RunConfig, values)
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import typer
from pydantic import BaseModel, ValidationError

from morphcache.errors import ConfigError

CONFIG_OPTION = "config"
#: Command-line forms a field may ask for with ``json_schema_extra={"cli_type": NAME}`` (names keep the JSON Schema
#: serialisable).
_CLI_TYPES = {"str": str, "list[str]": list[str]}


def _option_type(annotation) -> tuple[Any, str]:
    """The click-friendly type of a field annotation, and a note on allowed values for the help text."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _option_type(args[0])
        return str, ""
    if origin is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), "one of " + " | ".join(str(c) for c in choices)
    if origin is tuple:
        return annotation, ""
    if annotation in (int, float, str, bool, Path):
        return annotation, ""
    return str, ""


def _registered(registry_name: str | None) -> str:
    """``"registered: a | b"`` for a field marked ``json_schema_extra={"cli_registry": "losses"}`` (a registry of
    :mod:`morphcache.registries`; its entries at the time the command is built), else ``""``."""
    if not registry_name:
        return ""
    from morphcache import registries

    return "registered: " + " | ".join(registries.names(getattr(registries, registry_name)))


def model_parameters(model: type[BaseModel], exclude: typing.Collection[str] = ()) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of ``model`` (not in ``exclude``), each defaulting to None (= not
    given on the command line, so the file's value or the model's default applies)."""
    params = []
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        kind, allowed = _option_type(_CLI_TYPES[extra["cli_type"]] if "cli_type" in extra else field.annotation)
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=False)
        if isinstance(default, list) and kind is str:  # a list typed as one string on the command line
            default = ",".join(map(str, default))
        notes = [n for n in (field.description, allowed, _registered(extra.get("cli_registry"))) if n]
        help_text = "; ".join(notes) + (" (required)" if field.is_required() else
                                        f" (default: {default})" if default is not None else "")
        flags = extra.get("cli_flags") or (f"{flag}/--no-{flag[2:]}" if kind is bool else flag)
        decls = list(flags) if isinstance(flags, (list, tuple)) else [flags]
        option = typer.Option(*decls, help=help_text, show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=Annotated[typing.Optional[kind], option], default=None))
    return params


def load_config_file(path: str | Path, model: type[BaseModel]) -> dict:
    """The field values in a YAML or JSON file (a mapping of field names).

    Raises:
        ConfigError: unreadable file, not a mapping, or keys that are not fields of ``model``.
    """
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))  # YAML is a superset of JSON
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc}); pass a YAML or JSON file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}: not valid YAML/JSON{where}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must hold a mapping of option names to values, got {type(data).__name__}")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(model.model_fields))
    if unknown:
        raise ConfigError(f"--config {path}: unknown option(s) {', '.join(unknown)}; "
                          f"known: {', '.join(model.model_fields)}")
    return data


def validate_config(model: type[BaseModel], values: dict, source: str = "option") -> BaseModel:
    """``model(**values)``, with a validation error turned into one line naming the field, value and rule.

    Raises:
        ConfigError: the first invalid field.
    """
    try:
        return model(**values)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or source
        raise ConfigError(f"--{field.replace('_', '-')}: {err['msg']} (got {err.get('input')!r})") from None


def options_from_model(model: type[BaseModel], exclude: typing.Collection[str] = ()) -> Callable:
    """Decorate a typer command ``fn(values: dict, **own_options)``: the command gets ``--config FILE`` and one
    option per field of ``model``; ``fn`` receives the merged field values (model defaults < file < explicit
    flags; fields set nowhere are left out, so the model's defaults apply) and its own options unchanged."""

    def decorate(fn: Callable) -> Callable:
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in list(inspect.signature(fn).parameters.values())[1:]]
        fields = model_parameters(model, exclude)
        config_param = inspect.Parameter(
            CONFIG_OPTION, inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[typing.Optional[Path], typer.Option(
                "--config", help="YAML or JSON file of option values (e.g. a run's config.json); flags override it")])
        names = [p.name for p in fields]

        @functools.wraps(fn)
        def command(**kwargs):
            path = kwargs.pop(CONFIG_OPTION)
            given = {n: kwargs.pop(n) for n in names}
            values = load_config_file(path, model) if path is not None else {}
            values.update({n: (list(v) if isinstance(v, tuple) else v) for n, v in given.items() if v is not None})
            return fn(values, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + [config_param] + fields
        command.__signature__ = inspect.Signature(params, return_annotation=hints.get("return", inspect.Signature.empty))
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must see the generated signature, not fn's
        return command

    return decorate
