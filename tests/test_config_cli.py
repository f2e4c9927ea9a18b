"""Options generated from a pydantic model: help from the field, --config YAML/JSON, flags override the file,
one-line errors naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import pytest
import typer
from pydantic import BaseModel, Field, field_validator
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
    ("store: s\nlr: -1\n", r"bad.yaml: lr: Input should be greater than 0 \(got -1\)"),
    ("store: s\nloss: huber\n", r"bad.yaml: loss: Input should be 'l1' or 'l2' \(got 'huber'\)"),
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


def test_required_field_missing_everywhere_is_named(tmp_path):
    result, _ = _run(["run"])
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception) == "missing required option --store (or key store: in --config FILE)"
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lr: 0.5\n")
    result, _ = _run(["run", "--config", str(cfg)])
    assert str(result.exception) == f"missing required option --store (or key store: in {cfg})"


@pytest.mark.parametrize("content", ["", "# nothing set yet\n", "{}\n"])
def test_an_empty_config_file_says_so_and_names_what_is_required(tmp_path, content):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(content)
    result, _ = _run(["run", "--config", str(cfg)])
    assert isinstance(result.exception, ConfigError)
    assert str(result.exception) == f"{cfg} is empty; required: store"


def test_a_bad_value_names_the_file_and_key_or_the_flag_it_came_from(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("store: s\nlr: -1\n")
    result, _ = _run(["run", "--config", str(cfg)])
    assert str(result.exception) == f"{cfg}: lr: Input should be greater than 0 (got -1)"
    result, _ = _run(["run", "--config", str(cfg), "--lr", "-2"])  # the flag wins, so the flag is named
    assert str(result.exception) == "--lr: Input should be greater than 0 (got -2.0)"
    result, seen = _run(["run", "--config", str(cfg), "--lr", "0.5"])
    assert result.exit_code == 0 and seen["config"].lr == 0.5


class Flagged(BaseModel):
    cases: list[tuple[int, int]] | None = Field(default=None, json_schema_extra={"cli_flags": "--case",
                                                                                "cli_type": "list[str]"})
    checkpoint: str = Field(default="c", min_length=2, json_schema_extra={"cli_flags": ["--checkpoint", "-c"]})
    projected: int = Field(default=1, ge=0, json_schema_extra={"cli_flags": "--projected/--unprojected"})

    @field_validator("checkpoint")
    @classmethod
    def _no_x(cls, value):
        if value == "xx":
            raise ValueError("not xx")
        return value


def test_errors_name_the_field_s_cli_flag_and_drop_pydantic_s_value_error_prefix():
    from morphcache.config_cli import cli_flag

    assert [cli_flag(Flagged, n) for n in ("cases", "checkpoint", "projected", "other_name")] == [
        "--case", "--checkpoint", "--projected", "--other-name"]
    with pytest.raises(ConfigError, match=r"^--case: Input should be a valid list \(got '98'\)$"):
        validate_config(Flagged, {"cases": "98"})
    with pytest.raises(ConfigError, match=r"^--checkpoint: String should have at least 2 characters"):
        validate_config(Flagged, {"checkpoint": "c"})
    with pytest.raises(ConfigError, match=r"^--checkpoint: not xx \(got 'xx'\)$"):
        validate_config(Flagged, {"checkpoint": "xx"})


def test_a_list_str_field_is_a_repeatable_flag():
    app = typer.Typer()
    seen = {}

    @app.command()
    @options_from_model(Flagged)
    def run(values: dict) -> int:
        seen["values"] = dict(values)
        return 0

    @app.command()
    def other() -> None:
        pass

    assert CliRunner().invoke(app, ["run", "--case", "1,2", "--case", "3,4"]).exit_code == 0
    assert seen["values"] == {"cases": ["1,2", "3,4"]}
    assert CliRunner().invoke(app, ["run"]).exit_code == 0
    assert seen["values"] == {}  # not given: left to the model's default


def test_train_takes_every_run_option_from_a_config_file_and_flags_win(tmp_path, capsys):
    """RunConfig is the one definition: --config sets any field, explicit flags override it, presets fill sizes
    that neither sets, and a run directory's saved config loads back."""
    from morphcache.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text("store: /nowhere/store.zarr\nobjective: tokenwise\nepochs: 7\nloss: l1\npreset: cpu-small\n"
                   "decoder_dim: 384\ndtm_case_ranges: ['64,7', '32,3']\nmask_aspect: [0.5, 2.0]\n")
    assert main(["train", "--config", str(cfg), "--epochs", "9", "--print-config", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["objective"], printed["epochs"], printed["loss"]) == ("tokenwise", 9, "l1")
    assert printed["decoder_dim"] == 384 and printed["decoder_depth"] == 2  # explicit value beats the preset's
    assert printed["dtm_case_ranges"] == [[64, 7], [32, 3]] and printed["mask_aspect"] == [0.5, 2.0]
    assert printed["precision"] == "fp32"  # auto on CPU

    saved = tmp_path / "config.json"
    saved.write_text(json.dumps({k: v for k, v in printed.items() if k != "effective"}))
    assert main(["train", "--config", str(saved), "--print-config", "--device", "cpu"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert {k: v for k, v in again.items() if k != "effective"} == {k: v for k, v in printed.items() if k != "effective"}


def test_train_and_extract_config_errors_are_one_line_exit_2(tmp_path, capsys):
    from morphcache.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("store: s\nepochs: 0\n")
    assert main(["train", "--config", str(bad), "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"morphcache: error: {bad}: epochs: Input should be greater than 0 (got 0)"
    bad.write_text("data: d\nout: o\nviews: 2\nshard: 5/2\n")
    assert main(["extract", "--config", str(bad)]) == 2
    assert "--shard '5/2'" in capsys.readouterr().err
    bad.write_text("data: d\nout: o\nvews: 2\n")
    assert main(["extract", "--config", str(bad)]) == 2
    assert "unknown option(s) vews" in capsys.readouterr().err


def test_extract_from_a_config_file_equals_the_same_flags(tmp_path, capsys):
    from morphcache.cli import main
    from morphcache.testing.images import write_noise_pngs
    from morphcache.testing.stores import store_arrays

    data = write_noise_pngs(tmp_path / "imgs", 4, seed=1, prefix="c")
    flags = ["--teacher", "timm:vit_tiny_patch16_224", "--image-size", "32", "--views", "2", "--batch-size", "4",
             "--threads", "1", "--seed", "3", "--crop-scale", "0.5", "1.0"]
    assert main(["extract", "--data", str(data), "--out", str(tmp_path / "flags"), *flags]) == 0
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(f"data: {data}\nteacher: timm:vit_tiny_patch16_224\nimage_size: 32\nviews: 2\nbatch_size: 4\n"
                   "threads: 1\nseed: 9\naugment: {scale: [0.5, 1.0]}\n")
    assert main(["extract", "--config", str(cfg), "--seed", "3", "--out", str(tmp_path / "file")]) == 0
    a, b = store_arrays(tmp_path / "flags"), store_arrays(tmp_path / "file")
    import numpy as np

    for name in ("tokens", "scales", "views", "images/hash"):
        np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


@pytest.mark.parametrize("args, content, message", [
    (["--store", "s", "--dtm-case", "98"], None,
     "--dtm-case: each case must be N,K (two integers), e.g. 196,14; got '98'"),
    (["--store", "s", "--dtm-case", "98,7", "--dtm-case", "5,0"], None,
     "--dtm-case: each DTM case needs N >= 0 and K >= 1, got (5, 0)"),
    (["--store", "s", "--loss", "huber"], None,
     "--loss: not a registered loss; use one of cosine, l1, l2, smooth_l1 (got 'huber')"),
    ([], "store: s\ndtm_case_ranges: 98\n", "{cfg}: dtm_case_ranges: expected a list of N,K cases (two integers "
     "each), e.g. ['196,14', '98,7'] or --dtm-case 196,14 --dtm-case 98,7; got 98"),
    ([], "store: s\nepochs: ten\n", "{cfg}: epochs: Input should be a valid integer, unable to parse string as "
     "an integer (got 'ten')"),
    ([], "", "{cfg} is empty; required: store"),
    ([], "epochs: 2\n", "missing required option --store (or key store: in {cfg})"),
    (["--epochs", "3"], None, "missing required option --store (or key store: in --config FILE)"),
])
def test_train_errors_name_the_typed_flag_or_the_file_and_key_exit_2(tmp_path, capsys, args, content, message):
    from morphcache.cli import main

    cfg = tmp_path / "run.yaml"
    if content is not None:
        cfg.write_text(content)
        args = [*args, "--config", str(cfg)]
    assert main(["train", *args, "--print-config", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"morphcache: error: {message.format(cfg=cfg)}\n"


def test_dtm_case_repeats_per_case(capsys):
    from morphcache.cli import main

    assert main(["train", "--store", "s", "--dtm-case", "98,7", "--dtm-case", "20,2", "--print-config",
                 "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["dtm_case_ranges"] == [[98, 7], [20, 2]]


def test_extract_augment_errors_from_the_file_name_it(tmp_path, capsys):
    from morphcache.cli import main

    cfg = tmp_path / "extract.yaml"
    cfg.write_text("data: d\nout: o\naugment: {scale: [0.9, 0.1]}\n")
    assert main(["extract", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err == (f"morphcache: error: {cfg}: augment: scale must satisfy 0 < lo <= hi <= 1, "
                                       "got (0.9, 0.1)\n")
