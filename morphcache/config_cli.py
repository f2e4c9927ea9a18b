"""Command-line options generated from a pydantic model, plus ``--config FILE``: one definition per option.

As timm's ``--config`` and DINOv2's merged configs do, a command's options come from its config model
(:class:`~morphcache.schemas.RunConfig` for ``train``): each field becomes ``--field-name`` with the field's
description as help and its default shown; ``--config run.yaml`` (YAML or JSON, e.g. a run directory's
``config.json``) sets any field, and flags given explicitly override the file. The merged values are validated by
the model, and an invalid file or value is one line naming where it came from (the flag a user types, or the
``--config`` file and key), the value and what is allowed (:class:`~morphcache.errors.ConfigError`, exit 2). A field
whose command-line form differs from its type says so with ``Field(json_schema_extra={"cli_type": "str"})`` (e.g.
``--shard I/N`` for a ``(I, N)`` tuple, parsed by the model's validator; ``"list[str]"`` makes a repeatable flag);
``{"cli_flags": "--projected/--unprojected"}`` names a boolean's two flags, and a list
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
import re
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
    if annotation == list[str]:  # a repeatable option (``--dtm-case 196,14 --dtm-case 98,7``)
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


def _field_extra(field) -> dict:
    return field.json_schema_extra if field is not None and isinstance(field.json_schema_extra, dict) else {}


def _flag_declarations(name: str, extra: dict, boolean: bool) -> list[str]:
    """The typer declarations of field ``name``: its ``cli_flags`` (one string or a list of spellings), else the
    generated ``--field-name`` (``--field-name/--no-field-name`` for a boolean)."""
    flag = "--" + name.replace("_", "-")
    flags = extra.get("cli_flags") or (f"{flag}/--no-{flag[2:]}" if boolean else flag)
    return [str(f) for f in flags] if isinstance(flags, (list, tuple)) else [flags]


def cli_flag(model: type[BaseModel], name: str) -> str:
    """The flag a user types for field ``name`` of ``model``: the first of its declarations (``--dtm-case`` for
    ``dtm_case_ranges``, ``--projected`` of ``--projected/--unprojected``), else the generated ``--field-name``."""
    return _flag_declarations(name, _field_extra(model.model_fields.get(name)), boolean=False)[0].split("/")[0]


class ConfigValues(dict):
    """The merged field values of a command (a plain dict to its users) that remember where they came from, so a
    validation error can name the ``--config`` file and key or the flag: ``config_file`` (None without
    ``--config``), ``file_keys`` (the keys the file set), ``flag_keys`` (the fields given as flags; they win) and
    ``key_prefix`` (``"augment."`` for a mapping nested in the file)."""

    def __init__(self, values=(), config_file: str | Path | None = None, file_keys=(), flag_keys=(),
                 key_prefix: str = ""):
        super().__init__(values)
        self.config_file = config_file
        self.file_keys = frozenset(file_keys)
        self.flag_keys = frozenset(flag_keys)
        self.key_prefix = key_prefix

    def from_file(self, name: str) -> bool:
        """Whether field ``name``'s value is the config file's (set there and not overridden by a flag)."""
        return self.config_file is not None and name in self.file_keys and name not in self.flag_keys

    def nested(self, name: str) -> "ConfigValues":
        """The mapping under key ``name`` (e.g. extract's ``augment: {scale: ...}`` from the file), remembering
        its file so an error names ``FILE: augment.scale``."""
        inner = self[name]
        if not self.from_file(name):
            return ConfigValues(inner)
        return ConfigValues(inner, self.config_file, inner, (), f"{self.key_prefix}{name}.")

    def over(self, defaults: dict) -> "ConfigValues":
        """``{**defaults, **self}`` (e.g. a preset's sizes under the given values), keeping where each came from."""
        return ConfigValues({**defaults, **self}, self.config_file, self.file_keys, self.flag_keys, self.key_prefix)


def model_parameters(model: type[BaseModel], exclude: typing.Collection[str] = ()) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of ``model`` (not in ``exclude``), each defaulting to None (= not
    given on the command line, so the file's value or the model's default applies)."""
    params = []
    for name, field in model.model_fields.items():
        if name in exclude:
            continue
        extra = _field_extra(field)
        kind, allowed = _option_type(_CLI_TYPES[extra["cli_type"]] if "cli_type" in extra else field.annotation)
        default = field.get_default(call_default_factory=False)
        if isinstance(default, list) and kind is str:  # a list typed as one string on the command line
            default = ",".join(map(str, default))
        notes = [n for n in (field.description, allowed, _registered(extra.get("cli_registry"))) if n]
        help_text = "; ".join(notes) + (" (required)" if field.is_required() else
                                        f" (default: {default})" if default is not None else "")
        option = typer.Option(*_flag_declarations(name, extra, boolean=kind is bool), help=help_text, show_default=False,
                              metavar="<str>" if kind == list[str] else None)  # as before, not "<list[str]>"
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


def validate_config(model: type[BaseModel], values: dict, source: str | None = None) -> BaseModel:
    """``model(**values)``, with a validation error turned into one line naming where the value came from, the
    value and the rule: ``--flag: RULE (got VALUE)`` for a flag (the field's ``cli_flags``) or a plain dict,
    ``FILE: key: RULE (got VALUE)`` for a key of the ``--config`` file (``values`` a :class:`ConfigValues`). A
    missing required field names both ways to set it. ``source`` names the whole of ``values`` for an error that is
    not about one field (a model validator), e.g. ``"augment"``.

    Raises:
        ConfigError: the first invalid field, or every missing required one.
    """
    try:
        return model(**values)
    except ValidationError as exc:
        raise ConfigError(describe_error(model, values, exc, source)) from None


def _missing_field(error: dict) -> bool:
    """Whether a pydantic error is a required top-level field that was not given."""
    return error["type"] == "missing" and len(error["loc"]) == 1


def describe_error(model: type[BaseModel], values: dict, exc: ValidationError, source: str | None = None) -> str:
    """One line for ``exc`` (raised validating ``values`` against ``model``); see :func:`validate_config`."""
    errors = exc.errors()
    path = getattr(values, "config_file", None)
    prefix = getattr(values, "key_prefix", "")
    from_file = getattr(values, "from_file", lambda name: False)
    missing = list(dict.fromkeys(str(e["loc"][0]) for e in errors if _missing_field(e)))
    if _missing_field(errors[0]):
        if path is not None and not getattr(values, "file_keys", ()) and not prefix:
            return f"{path} is empty; required: {', '.join(missing)}"
        s = "s" if len(missing) > 1 else ""
        flags = ", ".join(cli_flag(model, n) for n in missing)
        keys = ", ".join(f"{prefix}{n}:" for n in missing)
        where = path if path is not None else "--config FILE"
        return f"missing required option{s} {flags} (or key{s} {keys} in {where})"
    err = errors[0]
    loc = [str(p) for p in err["loc"]]
    msg = err["msg"].removeprefix("Value error, ")
    if loc:
        head = f"{path}: {prefix}{'.'.join(loc)}" if from_file(loc[0]) else cli_flag(model, loc[0])
        got = "" if re.search(r"\bgot\b", msg) else f" (got {err.get('input')!r})"  # the rule may say it
        return f"{head}: {msg}{got}"
    if prefix:  # a rule of a mapping nested in the file
        return f"{path}: {prefix[:-1]}: {msg}"
    return f"--{source.replace('_', '-')}: {msg}" if source else msg


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
            from_file = load_config_file(path, model) if path is not None else {}
            flags = {n: (list(v) if isinstance(v, tuple) else v) for n, v in given.items()
                     if v is not None and v != ()}  # () = a repeatable option not given
            values = ConfigValues({**from_file, **flags}, path, from_file, flags)
            return fn(values, **kwargs)

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + [config_param] + fields
        command.__signature__ = inspect.Signature(params, return_annotation=hints.get("return", inspect.Signature.empty))
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # typer must see the generated signature, not fn's
        return command

    return decorate
