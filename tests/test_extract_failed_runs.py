"""A failed extract run changes nothing: any run that fails before its first chunk is finished leaves no store (or
the folder as it was), and the corrected command simply creates it. A store that existed before is never removed."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from morphcache.cli import main
from morphcache.testing.stores import make_image_table, make_spec

ARGS = ["--teacher", "timm:vit_tiny_patch16_224", "--image-size", "32", "--views", "2", "--batch-size", "4",
        "--threads", "1", "--chunk-images", "2", "--dtype", "float16", "--seed", "3"]


@pytest.fixture
def data(tmp_path) -> Path:
    """Four good PNGs and a truncated JPEG that sorts first (chunk 0)."""
    d = tmp_path / "data"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(d / f"img_{i}.png")
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(d / "a_bad.jpg", quality=90)
    raw = (d / "a_bad.jpg").read_bytes()
    (d / "a_bad.jpg").write_bytes(raw[: len(raw) // 2])
    return d


def extract(capsys, data: Path, out: Path, *extra: str) -> tuple[int, list[str]]:
    code = main(["extract", "--data", str(data), "--out", str(out), *ARGS, *extra])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("[extract")]
    return code, err


def test_bad_image_under_fail_leaves_no_store_and_the_fixed_command_creates_it(data, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "store.zarr"  # parent folders made by the run are removed too
    code, err = extract(capsys, data, out, "--on-bad-image", "fail")
    assert code == 2 and len(err) == 1 and "a_bad.jpg" in err[0] and "truncated" in err[0]
    assert not (tmp_path / "new").exists()
    (data / "a_bad.jpg").unlink()  # the fix
    code, _ = extract(capsys, data, out, "--on-bad-image", "fail")
    assert code == 0 and main(["store", "verify", str(out)]) == 0


def test_an_empty_out_folder_is_left_empty(data, tmp_path, capsys):
    out = tmp_path / "made_by_user"
    out.mkdir()
    code, _ = extract(capsys, data, out, "--on-bad-image", "fail")
    assert code == 2 and out.is_dir() and list(out.iterdir()) == []
    code, _ = extract(capsys, data, out)  # the same folder, now skipping the bad image
    assert code == 0 and (out / "zarr.json").is_file()


@pytest.mark.parametrize("change", [
    ["--teacher", "timm:vit_nonexistent_patch99"],  # a teacher that cannot load
    ["--teacher", "timm:vit_tiny_patch16_224:/no/such/weights.pth"],
    ["--teacher", "open_clip:ViT-B-16:openai"],  # a download tag, no network
    ["--image-size", "33"],  # not whole patches
    ["--data", "MISSING"],  # a wrong path
    ["--views", "0"],  # bad options
    ["--dtype", "int4"],
    ["--on-bad-image", "ignore"],
    ["--limit", "0"],
])
def test_every_early_failure_leaves_nothing(data, tmp_path, capsys, change):
    out = tmp_path / "parent" / "store.zarr"
    args = [str(tmp_path / "missing") if a == "MISSING" else a for a in change]
    code, err = extract(capsys, data, out, *args)
    assert code == 2 and len(err) == 1, err
    assert not (tmp_path / "parent").exists()
    code, _ = extract(capsys, data, out)  # the corrected command
    assert code == 0 and (out / "zarr.json").is_file()


def test_a_resumed_store_is_never_removed(data, tmp_path, capsys):
    """A store that existed before the run (here: created, no chunk finished yet) stays when the resume fails."""
    from morphcache.extract.pipeline import ExtractOptions
    from morphcache.extract.engine import load_teacher_by_name
    from morphcache.extract.store_setup import create_store, plan_store
    from morphcache.store.feature_store import FeatureStore

    out = tmp_path / "store.zarr"
    opts = ExtractOptions(data=str(data), out=str(out), teacher="timm:vit_tiny_patch16_224", image_size=32,
                          batch_size=4, threads=1, chunk_images=2, dtype="float16", seed=3)
    spec, table = plan_store(opts, load_teacher_by_name(opts.teacher, 32).spec)
    create_store(out, spec, table)
    code, err = extract(capsys, data, out, "--on-bad-image", "fail")
    assert code == 2 and "a_bad.jpg" in err[0]
    store = FeatureStore.open(out)
    assert store.progress().tolist() == [0, 0, 0]
    code, _ = extract(capsys, data, out)  # resumes it
    assert code == 0 and FeatureStore.open(out).is_complete()


def test_run_store_undoes_only_what_nobody_else_uses(tmp_path):
    """The library level: any exception (Ctrl-C too) removes a new store, unless another process (a shard of
    the same store) holds it or a chunk is finished."""
    from morphcache.extract.store_setup import run_store
    from morphcache.store.feature_store import FeatureStore

    spec, table = make_spec(n_images=4), make_image_table(4)
    out = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):
        with run_store(out, spec, table):
            raise KeyboardInterrupt
    assert not out.exists()

    with pytest.raises(RuntimeError):
        with run_store(out, spec, table):
            other = os.open(out, os.O_RDONLY)  # another open file description: as another process's shard
            fcntl.flock(other, fcntl.LOCK_SH)
            raise RuntimeError("this shard failed")
    os.close(other)
    assert FeatureStore.open(out).spec.n_images == 4  # the other shard's store stays

    out2 = tmp_path / "s2"
    with pytest.raises(RuntimeError):
        with run_store(out2, spec, table) as store:
            from morphcache.testing.stores import make_chunk

            store.write_chunk(0, *make_chunk(spec, 0))
            raise RuntimeError("after the first chunk")
    assert FeatureStore.open(out2).progress().tolist() == [1, 0]  # resumable: kept

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not a zarr store"):
        with run_store(tmp_path / "busy", spec, table):
            pass
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"  # not ours: untouched


def test_remote_dask_undoes_the_store_only_before_tasks_are_submitted(data, tmp_path, capsys, monkeypatch):
    """An unreachable scheduler fails before any task: nothing is left. Once tasks are submitted to a remote
    scheduler, its workers may still write after the error, so the store is kept (resumable)."""
    from morphcache.errors import BadImageError, ConfigError
    from morphcache.extract import distributed

    def unreachable(address, n_workers, **kwargs):  # what _client raises after its 30 s connect timeout
        raise ConfigError(f"--dask {address}: cannot reach the dask scheduler (OSError)")

    monkeypatch.setattr(distributed, "_client", unreachable)
    out = tmp_path / "store.zarr"
    code, err = extract(capsys, data, out, "--dask", "tcp://127.0.0.1:9")
    assert code == 2 and "cannot reach" in err[0] and not out.exists()

    def submitted_then_failed(store, chunks, opts, on_submit=None):
        on_submit()
        raise BadImageError("a_bad.jpg: truncated file (in a remote worker)")

    monkeypatch.setattr(distributed, "run_dask", submitted_then_failed)
    code, err = extract(capsys, data, out, "--dask", "tcp://127.0.0.1:9")
    assert code == 2 and (out / "zarr.json").is_file()
