"""Evaluation settings are pydantic models, and every ``morphcache eval`` command takes its options from one of them:
``--config`` (YAML/JSON) sets any option, flags override the file, the resolved config is kept beside the results
and loads back, and a bad key or value is one line naming it (exit 2)."""

from __future__ import annotations

import json

import pytest

from morphcache.cli import main
from morphcache.config_cli import validate_config
from morphcache.errors import ConfigError
from morphcache.evaluate.config import (
    EVAL_COMMANDS,
    FinetuneEvalOptions,
    LinearEvalOptions,
    SegmentEvalOptions,
    TransferEvalOptions,
    resolved_config_path,
)
from morphcache.evaluate.results import load_results
from morphcache.evaluate.settings import EvalSettings, FinetuneConfig, KnnConfig, LinearProbeConfig, SegProbeConfig

TINY = "random:vit_tiny_patch16_224"
DIGITS = "digits?train=30&test=10"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_protocol_settings_dump_the_keys_result_rows_always_had():
    """model_dump replaces the dataclasses' to_dict with the same keys and values (old eval.jsonl rows and
    ``report`` keep working)."""
    assert KnnConfig().model_dump() == {"k": 20, "temperature": 0.07, "chunk_size": 1024}
    assert LinearProbeConfig().model_dump() == {"epochs": 50, "batch_size": 128, "lr": 3e-3, "weight_decay": 0.0,
                                                "optimizer": "adamw", "seed": 0}
    assert list(FinetuneConfig().model_dump()) == [
        "epochs", "batch_size", "lr", "min_lr", "weight_decay", "layer_decay", "drop_path", "label_smoothing",
        "warmup_fraction", "crop_scale", "hflip", "max_steps", "precision", "seed"]
    assert SegProbeConfig().model_dump() == {"layers": 1, "batchnorm": True, "epochs": 20, "batch_size": 16,
                                             "lr": 1e-3, "weight_decay": 1e-4, "optimizer": "adamw",
                                             "label_size": None, "seed": 0, "n_examples": 4}
    with pytest.raises(ValueError, match="greater than 0"):
        KnnConfig(k=0)
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        LinearProbeConfig(epoch=3)
    with pytest.raises(ConfigError, match=r"^--optimizer: Input should be 'adamw' or 'sgd' \(got 'adam'\)$"):
        validate_config(LinearProbeConfig, {"optimizer": "adam"})


def test_each_command_model_maps_to_the_settings_the_old_flags_built():
    """Shared fields (batch, precision) and copied protocol fields reach the protocol settings; knobs a command does
    not expose keep the protocol's default (the linear probe's own batch stays 128)."""
    lin = LinearEvalOptions(checkpoint=TINY, dataset="digits", epochs=3, batch_size=7).settings("fp32", "cpu")
    assert isinstance(lin, EvalSettings) and lin.batch_size == 7 and lin.linear.batch_size == 128
    assert lin.linear.epochs == 3 and lin.knn == KnnConfig()
    ft = FinetuneEvalOptions(checkpoint=TINY, dataset="digits", max_steps=2)
    assert (ft.batch_size, ft.pooling) == (32, "mean")  # the fine-tuning command's own defaults
    s = ft.settings("bf16", "cpu")
    assert (s.finetune.batch_size, s.finetune.max_steps, s.finetune.precision) == (32, 2, "bf16")
    seg = SegmentEvalOptions(checkpoint=TINY, dataset="seg-folder:/x", n_examples=0, layers=2).settings("fp32", "cpu")
    assert (seg.segment.batch_size, seg.segment.n_examples, seg.segment.layers) == (16, 0, 2)
    tr = validate_config(TransferEvalOptions, {"checkpoint": TINY, "dataset": "digits", "to": "folder:/p",
                                               "protocols": "knn, finetune"})
    assert tr.protocols == ["knn", "finetune"] and tr.settings("fp32", "cpu").finetune.precision == "fp32"
    for name, model in EVAL_COMMANDS.items():  # one definition per option: no field is both base and copied
        assert model.COMMAND == name and "checkpoint" in model.model_fields


@pytest.mark.parametrize("command", list(EVAL_COMMANDS))
def test_every_eval_command_has_help_from_its_model(command, capsys):
    assert main(["eval", command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for piece in ("--config", "--checkpoint", "--dataset", "--batch-size", "registered:"):
        assert piece in text, (command, piece)
    extra = {"knn": ["--k", "--temperature"], "linear": ["--optimizer", "--epochs"], "frozen": ["--k", "--epochs"],
             "finetune": ["--layer-decay", "--hflip"], "transfer": ["--to", "--protocols", "--no-source"],
             "segment": ["--layers", "--no-batchnorm", "--examples", "--label-size"]}[command]
    for piece in extra:
        assert piece in text, (command, piece)


def test_eval_config_round_trip_and_flags_override_the_file(tmp_path):
    results = tmp_path / "eval.jsonl"
    base = ["eval", "knn", "-c", TINY, "--img-size", "32", "-d", DIGITS, "--device", "cpu"]
    assert main([*base, "--results", str(results), "--k", "5", "--temperature", "0.1"]) == 0
    saved = resolved_config_path(results, "knn")
    assert saved == tmp_path / "eval.knn.config.json"
    first = json.loads(saved.read_text())
    assert first["k"] == 5 and first["temperature"] == 0.1 and first["precision"] == "fp32"  # auto -> fp32 on CPU
    assert first["device"] == "cpu" and first["results"] == str(results) and first["dataset"] == DIGITS

    assert main(["eval", "knn", "--config", str(saved)]) == 0  # fed back: the same run, the same resolved config
    assert json.loads(saved.read_text()) == first
    assert main(["eval", "knn", "--config", str(saved), "--k", "3"]) == 0  # the flag beats the file
    third = json.loads(saved.read_text())
    assert third == {**first, "k": 3}
    rows = load_results(results)
    assert [r["config"]["k"] for r in rows] == [5, 5, 3] and all(r["config"]["temperature"] == 0.1 for r in rows)
    assert rows[0]["config"] == rows[1]["config"] and rows[0]["metrics"] == rows[1]["metrics"]


def test_a_yaml_config_sets_segment_options(tmp_path):
    cfg = tmp_path / "seg.yaml"
    cfg.write_text("checkpoint: random:vit_tiny_patch16_224\ndataset: ade20k:/data/ade\nlayers: 3\n"
                   "n_examples: 0\nbatchnorm: false\n")
    from morphcache.config_cli import load_config_file

    options = validate_config(SegmentEvalOptions, load_config_file(cfg, SegmentEvalOptions))
    assert (options.layers, options.n_examples, options.batchnorm, options.batch_size) == (3, 0, False, 16)


@pytest.mark.parametrize("command, content, message", [
    ("knn", "checkpoint: c\ndataset: digits\nkk: 3\n", "unknown option(s) kk; known: checkpoint"),
    ("knn", "checkpoint: c\ndataset: digits\nk: 0\n", "bad.yaml: k: Input should be greater than 0 (got 0)"),
    ("linear", "checkpoint: c\ndataset: mnist\n", "bad.yaml: dataset: unknown dataset 'mnist'; registered: "),
    ("finetune", "checkpoint: c\ndataset: digits\nhflip: 2\n",
     "bad.yaml: hflip: Input should be less than or equal to 1"),
    ("transfer", "checkpoint: c\ndataset: digits\nto: digits\nprotocols: knn,bogus\n",
     "unknown protocol 'bogus'; registered: finetune, knn, linear, segment"),
    ("segment", "checkpoint: c\ndataset: ade20k:/x\nprecision: fp16\n",
     "bad.yaml: precision: Input should be 'auto', 'fp32' or 'bf16' (got 'fp16')"),
])
def test_bad_config_keys_and_values_are_one_line_exit_2(tmp_path, capsys, command, content, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    assert main(["eval", command, "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("morphcache: error: ") and message in err, err
    assert not list(tmp_path.glob("*.jsonl"))


def test_eval_errors_name_the_flag_a_user_types_and_what_is_missing(tmp_path, capsys):
    """A flag's error names the flag (``--dataset``, the first of ``-d/--dataset``; ``--checkpoint`` not
    ``--checkpoint``'s field name), without pydantic's ``Value error, `` prefix; a missing required option names the
    flag and the ``--config`` key."""
    assert main(["eval", "linear", "-c", "c", "-d", "mnist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("morphcache: error: --dataset: unknown dataset 'mnist'; registered: ")
    assert "Value error" not in err
    assert main(["eval", "knn", "--dataset", "digits"]) == 2
    assert capsys.readouterr().err == ("morphcache: error: missing required option --checkpoint (or key checkpoint: "
                                       "in --config FILE)\n")
    cfg = tmp_path / "knn.yaml"
    cfg.write_text("")
    assert main(["eval", "knn", "--config", str(cfg)]) == 2
    assert capsys.readouterr().err == f"morphcache: error: {cfg} is empty; required: checkpoint, dataset\n"
