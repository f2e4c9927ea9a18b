"""``morphcache store info | verify | stats`` and bad input (exit 2, one line, nothing modified)."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from morphcache.cli import main
from morphcache.schemas import SCHEMA_VERSION
from morphcache.store.feature_store import FeatureStore
from morphcache.store.stats import grid_geometry

sys.path.insert(0, str(Path(__file__).parent))
from morphcache.testing.stores import make_store  # noqa: E402
from test_store import tree_hash  # noqa: E402


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_text_and_json(tmp_path, capsys):
    make_store(tmp_path / "s", n_images=7, dtype="int8", complete=False, skipped=(1,))
    code, out, _ = run(capsys, "store", "info", str(tmp_path / "s"))
    assert code == 0
    assert "3/4 chunks (75.0%)" in out and "int8 (absmax-per-token)" in out and "missing     chunks 3" in out
    code, out, _ = run(capsys, "store", "info", str(tmp_path / "s"), "--json")
    info = json.loads(out)
    assert info["progress"]["chunks_done"] == 3 and info["progress"]["rows_written"] == 12
    assert info["progress"]["rows_servable"] == 10 and info["progress"]["missing_chunks"] == [3]
    assert info["images"] == {"ok": 5, "corrupt or unreadable image data": 1, "not processed yet": 1}
    assert info["disk"]["bytes_per_view_uncompressed"] == 16 * (32 + 2) + 32 * 2 + 9 * 4
    # no compression: token + scale + pooled + views data files hold at least the raw bytes of 12 rows
    assert info["disk"]["bytes_per_view_on_disk"] >= info["disk"]["bytes_per_view_uncompressed"]
    assert info["disk"]["per_array_bytes"]["tokens"] >= 12 * 16 * 32
    assert info["spec"]["teacher"]["dim"] == 32 and info["storage"]["compression"] == "none"


def test_verify_good_store(tmp_path, capsys):
    make_store(tmp_path / "s", dtype="float16")
    code, out, _ = run(capsys, "store", "verify", str(tmp_path / "s"))
    assert code == 0 and "ok, 3 chunks verified" in out


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_verify_finds_flipped_byte_missing_chunk_and_nan(tmp_path, capsys, compression):
    make_store(tmp_path / "s", n_images=8, chunk_images=2, compression=compression, complete=False)
    shard = tmp_path / "s" / "tokens" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x5A  # inside the first inner chunk's bytes
    shard.write_bytes(bytes(data))
    g = zarr.open_group(str(tmp_path / "s"), mode="r+")
    g["pooled"][9, 3] = np.nan  # chunk 2
    code, out, err = run(capsys, "store", "verify", str(tmp_path / "s"))
    assert code == 1
    bad = {line.split("chunk ")[1].split(":")[0]: line for line in out.splitlines() if ": chunk " in line}
    assert sorted(bad) == ["1", "2", "3"]
    assert "checksum mismatch" in bad["1"] or "unreadable" in bad["1"]
    assert "NaN/inf values in pooled" in bad["2"] and "checksum mismatch" in bad["2"]
    assert "not written" in bad["3"]
    assert "3 of 4 chunks bad" in out
    assert "verify" in err  # progress output


def test_stats_match_direct_numpy(tmp_path, capsys):
    store = make_store(tmp_path / "s", n_images=7, chunk_images=2, T=16, D=32, complete=False, skipped=(2,))
    code, out, _ = run(capsys, "store", "stats", str(tmp_path / "s"), "--out", str(tmp_path / "st"), "--k", "4")
    assert code == 0 and "4-neighbour cosine" in out
    stats = json.loads((tmp_path / "st" / "stats.json").read_text())
    assert (tmp_path / "st" / "stats.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = store.ok_rows()
    assert stats["rows"] == rows.size == 10
    x = store.read_tokens_numpy(rows).astype(np.float64)
    flat = x.reshape(-1, 32)
    np.testing.assert_allclose(stats["channel_mean"], flat.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["channel_std"], flat.std(0), rtol=1e-4)
    norms = np.linalg.norm(flat, axis=1)
    assert sum(stats["norm_hist"]["counts"]) == flat.shape[0]
    assert stats["norm_hist"]["edges"][-1] == pytest.approx(norms.max(), rel=1e-5)
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
    g = xn.reshape(-1, 4, 4, 32)
    nb = np.concatenate([(g[:, :, 1:] * g[:, :, :-1]).sum(-1).ravel(), (g[:, 1:] * g[:, :-1]).sum(-1).ravel()])
    assert stats["neighbour_cosine"] == pytest.approx(nb.mean(), rel=1e-5)
    dist, adj = grid_geometry(4, 4)
    gram = np.einsum("ntd,nsd->nts", xn, xn)
    assert stats["cosine_by_distance"]["1"] == pytest.approx(gram[:, dist == 1].mean(), rel=1e-5)
    hits = 0
    for v in range(gram.shape[0]):
        for i in range(16):
            sim = gram[v, i].copy()
            sim[i] = -np.inf
            hits += adj[i, np.argsort(-sim)[:4]].sum()
    assert stats["knn_adjacent_fraction"] == pytest.approx(hits / (gram.shape[0] * 16 * 4), rel=1e-6)
    assert stats["knn_adjacent_chance"] == pytest.approx(adj.sum() / (16 * 15))
    # the synthetic tokens are smooth on the grid: spatially consistent well above chance
    assert stats["knn_adjacent_fraction"] > 1.2 * stats["knn_adjacent_chance"]
    assert stats["cosine_by_distance"]["1"] > stats["cosine_by_distance"]["3"]


def test_stats_on_a_distributed_local_cluster(tmp_path, capsys):
    make_store(tmp_path / "s", n_images=4)
    code, _, _ = run(capsys, "store", "stats", str(tmp_path / "s"), "--out", str(tmp_path / "a"))
    code2, _, _ = run(capsys, "store", "stats", str(tmp_path / "s"), "--out", str(tmp_path / "b"), "--dask", "local")
    assert code == code2 == 0
    a = json.loads((tmp_path / "a" / "stats.json").read_text())
    b = json.loads((tmp_path / "b" / "stats.json").read_text())
    assert b["dask"] == "local"
    assert a["neighbour_cosine"] == pytest.approx(b["neighbour_cosine"], rel=1e-9)
    assert a["norm_hist"] == b["norm_hist"]


def _damage(kind: str, root: Path) -> str:
    """Break the store at ``root``; return a regex the error line must match."""
    if kind == "not_a_store":
        (root / "zarr.json").unlink()
        return "not a zarr store"
    if kind == "plain_file":
        shutil.rmtree(root)
        root.write_text("hello")
        return "not a zarr store"
    if kind == "array_dir_deleted":
        shutil.rmtree(root / "scales")
        return "truncated store, array 'scales' is missing"
    if kind == "array_meta_deleted":
        (root / "pooled" / "zarr.json").unlink()
        return "truncated store, array 'pooled' is missing"
    if kind == "other_version":
        meta = json.loads((root / "zarr.json").read_text())
        meta["attributes"]["morphcache"]["schema_version"] = SCHEMA_VERSION + 1
        (root / "zarr.json").write_text(json.dumps(meta))
        return f"schema version {SCHEMA_VERSION + 1} .*version {SCHEMA_VERSION}"
    if kind == "no_spec":
        meta = json.loads((root / "zarr.json").read_text())
        del meta["attributes"]["morphcache"]
        (root / "zarr.json").write_text(json.dumps(meta))
        return "no 'morphcache' spec"
    if kind == "missing":
        shutil.rmtree(root)
        return "no such store"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["not_a_store", "plain_file", "array_dir_deleted", "array_meta_deleted",
                                  "other_version", "no_spec", "missing"])
@pytest.mark.parametrize("command", ["info", "verify", "stats"])
def test_bad_input_is_one_line_exit_2_and_nothing_changes(tmp_path, capsys, kind, command):
    root = tmp_path / "s"
    make_store(root, n_images=2)
    pattern = _damage(kind, root)
    before = tree_hash(tmp_path)
    code, out, err = run(capsys, "store", command, str(root), *(["--out", str(tmp_path / "st")] if command == "stats" else []))
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"morphcache: error: {root}: ")
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert tree_hash(tmp_path) == before and not (tmp_path / "st").exists()


def test_stats_refuses_a_store_with_nothing_written(tmp_path, capsys):
    spec_store = make_store(tmp_path / "s", n_images=2, chunk_images=2, complete=False)
    assert spec_store.n_chunks == 1
    code, _, err = run(capsys, "store", "stats", str(tmp_path / "s"), "--out", str(tmp_path / "st"))
    assert code == 2 and "no servable rows" in err
    # the library function refuses it too, with the store's error class (its docstring's Raises:)
    import dask

    from morphcache.errors import StoreError
    from morphcache.store.stats import compute_stats

    with dask.config.set(scheduler="sync"), pytest.raises(StoreError, match="no servable rows"):
        compute_stats(spec_store)


def test_open_in_append_mode_does_not_modify(tmp_path):
    make_store(tmp_path / "s")
    before = tree_hash(tmp_path / "s")
    FeatureStore.open(tmp_path / "s", "a").read_raw([0, 3])
    assert tree_hash(tmp_path / "s") == before
