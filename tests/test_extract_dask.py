"""Scale-out: a 2-worker dask LocalCluster (processes, one thread each) writes the same store as one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from morphcache.cli import main
from morphcache.errors import ConfigError
from morphcache.extract.distributed import parse_shard, shard_chunks
from morphcache.testing.images import write_noise_pngs
from morphcache.testing.stores import store_arrays

ARGS = ["--teacher", "timm:vit_tiny_patch16_224", "--image-size", "32", "--views", "2", "--batch-size", "4", "--threads", "1",
        "--chunk-images", "2", "--dtype", "int8", "--seed", "5"]


def write_images(folder: Path, n: int) -> Path:
    return write_noise_pngs(folder, n, seed=2, prefix="d")


def arrays(path) -> dict:
    return store_arrays(path)


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1) and parse_shard(" 3 / 4 ") == (3, 4)
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(ConfigError, match="--shard"):
            parse_shard(bad)
    assert shard_chunks(range(7), 1, 3) == [1, 4]
    assert sorted(shard_chunks(range(7), 0, 2) + shard_chunks(range(7), 1, 2)) == list(range(7))


@pytest.mark.slow
def test_dask_local_cluster_matches_single_process(tmp_path, capsys):
    data = write_images(tmp_path / "imgs", 12)
    single, fanned = tmp_path / "single", tmp_path / "dask"
    assert main(["extract", "--data", str(data), "--out", str(single), *ARGS]) == 0
    assert main(["extract", "--data", str(data), "--out", str(fanned), *ARGS, "--dask", "local",
                 "--dask-workers", "2"]) == 0
    assert "6 chunks, 24 views" in capsys.readouterr().out
    a, b = arrays(single), arrays(fanned)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"array {name} differs between dask and single-process runs"


def test_dask_task_skips_done_chunks(tmp_path):
    """A (re)submitted task on a finished chunk does nothing: tasks are idempotent."""
    from morphcache.extract.distributed import extract_chunk_task
    from morphcache.store.feature_store import FeatureStore

    data = write_images(tmp_path / "imgs", 4)
    out = tmp_path / "s"
    assert main(["extract", "--data", str(data), "--out", str(out), *ARGS]) == 0
    before = arrays(out)
    res = extract_chunk_task(str(out), 1, {"teacher": "timm:vit_tiny_patch16_224", "image_size": 32,
                                           "projected": False, "device": "cpu", "precision": "fp32"}, 4, 1, "skip")
    assert res == {"chunks": [], "views": 0, "bad": []}
    assert arrays(out) == before and FeatureStore.open(out).is_complete()


def test_worker_state_is_a_plugin_kept_across_tasks_and_released_after_a_job(tmp_path):
    """A worker keeps one teacher and image table across its tasks (in the registered WorkerPlugin, not in module
    globals); unregistering the plugin at the end of a job releases them on the worker."""
    from dask.distributed import Client, LocalCluster

    from morphcache.extract import distributed
    from morphcache.extract.worker_state import PLUGIN_NAME, ExtractionWorkerState
    from morphcache.store.feature_store import FeatureStore

    data = write_images(tmp_path / "imgs", 8)
    out = tmp_path / "s"
    assert main(["extract", "--data", str(data), "--out", str(out), *ARGS, "--shard", "1/2"]) == 0  # half the chunks
    missing = FeatureStore.open(out).missing_chunks()
    assert len(missing) >= 2
    teacher = {"teacher": "timm:vit_tiny_patch16_224", "image_size": 32, "projected": False, "device": "cpu",
               "precision": "fp32"}
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.register_plugin(ExtractionWorkerState())

        def cached(dask_worker):
            state = dask_worker.plugins[PLUGIN_NAME]
            return len(state.extractors), len(state.tables)

        for c in missing[:2]:
            res = client.submit(distributed.extract_chunk_task, str(out), c, teacher, 4, 1, "skip", pure=False).result()
            assert res["chunks"] == [c]
        assert list(client.run(cached).values()) == [(1, 1)]  # one teacher, loaded once for both tasks
        (worker,) = cluster.workers.values()
        state_on_worker = worker.plugins[PLUGIN_NAME]
        client.unregister_worker_plugin(PLUGIN_NAME)
        assert not state_on_worker.extractors and not state_on_worker.tables  # teardown released them
        assert all(PLUGIN_NAME not in w.plugins for w in cluster.workers.values())
    state = ExtractionWorkerState()
    state.extractors["x"], state.tables["y"] = object(), object()
    assert state.release() == 1 and not state.extractors and not state.tables
