"""Options generated from a pydantic model: help from the field, --config YAML/JSON, flags override the file,
one-line errors naming the field."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import pytest
import typer
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from morphcache.config_cli import options_from_model, validate_config
from morphcache.errors import ConfigError


class Toy(BaseModel):
    store: str = Field(description="where the data is")
    lr: float = Field(default=0.1, gt=0, description="learning rate")
    loss: Literal["l1", "l2"] = "l2"
    steps: int | None = None
    aspect: tuple[float, float] = (0.3, 3.3)
    online: bool = False


def _app(seen: dict) -> typer.Typer:
    app = typer.Typer()

    @app.command()
    @options_from_model(Toy)
    def run(values: dict, out: Annotated[Path, typer.Option("--out", help="output dir")] = Path("o")) -> int:
        seen["config"] = validate_config(Toy, values)
        seen["out"] = out
        return 0

    @app.command()
    def other() -> None:  # a second command keeps typer in multi-command mode
        pass

    return app


def _run(args, tmp_path=None):
    seen: dict = {}
    result = CliRunner().invoke(_app(seen), args, env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    return result, seen


def test_help_comes_from_the_model():
    result, _ = _run(["run", "--help"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    for piece in ("--lr", "learning rate", "(default: 0.1)", "--loss", "one of l1 | l2", "--online", "--config",
                  "--aspect", "--out"):
        assert piece in text, piece


def test_flags_override_the_file_and_the_file_overrides_defaults(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("store: /data/a\nlr: 0.5\nloss: l1\naspect: [0.5, 2.0]\nonline: true\n")
    result, seen = _run(["run", "--config", str(cfg), "--lr", "0.25", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    c = seen["config"]
    assert (c.store, c.lr, c.loss, c.aspect, c.online, c.steps) == ("/data/a", 0.25, "l1", (0.5, 2.0), True, None)
    result, seen = _run(["run", "--config", str(cfg), "--no-online"])
    assert seen["config"].online is False


def test_a_saved_json_config_loads_back(tmp_path):
    saved = Toy(store="s", lr=0.3, steps=7)
    (tmp_path / "config.json").write_text(saved.model_dump_json())
    result, seen = _run(["run", "--config", str(tmp_path / "config.json")])
    assert result.exit_code == 0 and seen["config"] == saved


@pytest.mark.parametrize("content, message", [
    ("store: s\nlr: -1\n", r"--lr: Input should be greater than 0 \(got -1\)"),
    ("store: s\nloss: huber\n", r"--loss: Input should be 'l1' or 'l2' \(got 'huber'\)"),
    ("store: s\nlearning_rate: 1\n", r"unknown option\(s\) learning_rate; known: store, lr"),
    ("- a\n- b\n", "must hold a mapping"),
    ("store: [unclosed\n", "not valid YAML/JSON at line"),
])
def test_invalid_files_and_values_are_one_line(tmp_path, content, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    result, _ = _run(["run", "--config", str(cfg)])
    assert isinstance(result.exception, ConfigError)
    assert "\n" not in str(result.exception)
    import re
    assert re.search(message, str(result.exception)), str(result.exception)


def test_missing_config_file_is_named(tmp_path):
    result, _ = _run(["run", "--config", str(tmp_path / "absent.yaml")])
    assert isinstance(result.exception, ConfigError) and "absent.yaml: cannot read it" in str(result.exception)


def test_required_field_missing_everywhere_is_named():
    result, _ = _run(["run"])
    assert isinstance(result.exception, ConfigError) and str(result.exception).startswith("--store: Field required")
