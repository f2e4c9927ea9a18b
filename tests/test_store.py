"""FeatureStore: round trips, fast row reads vs zarr, crash safety, concurrent writers, spec checks, plain
zarr/dask interoperability, xarray view."""

import hashlib
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from morphcache.errors import SpecMismatchError, StoreError
from morphcache.store.feature_store import FeatureStore, ShardRowReader
from morphcache.store.verify import verify_store

sys.path.insert(0, str(Path(__file__).parent))
from morphcache.testing.stores import expected_tokens, make_chunk, make_image_table, make_spec, make_store  # noqa: E402

TESTS_DIR = str(Path(__file__).parent)


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in Path(path).rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


def run_py(code: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=120)


@pytest.mark.parametrize("dtype", ["int8", "float16"])
@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_round_trip(tmp_path, dtype, compression):
    make_store(tmp_path / "s", n_images=7, dtype=dtype, compression=compression, skipped=(3,))
    store = FeatureStore.open(tmp_path / "s")
    x = expected_tokens(store.spec, skipped=(3,))
    got = store.read_tokens(slice(None)).numpy()
    assert got.shape == x.shape == (14, 16, 32)
    if dtype == "float16":
        np.testing.assert_array_equal(got, x.astype(np.float16).astype(np.float32))
    else:
        step = np.abs(x).max(-1, keepdims=True) / 127
        assert np.all(np.abs(got - x) <= 0.5 * step * (1 + 2.0**-9) + 1e-7)
    pooled = np.concatenate([make_chunk(store.spec, c, skipped=(3,))[1] for c in range(store.n_chunks)])
    views = np.concatenate([make_chunk(store.spec, c, skipped=(3,))[2] for c in range(store.n_chunks)])
    np.testing.assert_array_equal(store.read_pooled(slice(None)), pooled.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(store.read_views([4, 0, 13]), views[[4, 0, 13]])
    assert store.ok_rows().tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]
    assert store.image_table().status.tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert store.image_table().path[2] == "img_0002.png"


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("inner", [1, 2])
def test_fast_row_reads_equal_zarr(tmp_path, compression, inner):
    spec = make_spec(n_images=9, dtype="int8", chunk_images=2)
    store = FeatureStore.create(tmp_path / "s", spec, make_image_table(9), rows_per_inner_chunk=inner, compression=compression)
    for c in range(store.n_chunks - 1):  # last chunk left empty: fill values
        store.write_chunk(c, *make_chunk(spec, c, skipped=(4,)))
    ro = FeatureStore.open(tmp_path / "s", "r")
    assert ro._reader("tokens") is not None and ro._reader("scales") is not None
    g = zarr.open_group(str(tmp_path / "s"), mode="r")
    tok, sc = g["tokens"][:], g["scales"][:]
    rng = np.random.default_rng(0)
    cases = [np.arange(18), np.array([17, 3, 3, 0, 9, 8, 16]), rng.permutation(18)[:11], np.array([5]),
             np.array([], dtype=np.int64), np.array([2, 3, 4, 5, 6, 7]), np.array([7, 6, 5])]
    for handle in (ro, store):  # read-only (caches shard handles) and append mode
        for rows in cases:
            q, s = handle.read_raw(rows)
            np.testing.assert_array_equal(q, tok[rows])
            np.testing.assert_array_equal(s, sc[rows])
        np.testing.assert_array_equal(handle.read_raw(slice(3, 15))[0], tok[3:15])
        np.testing.assert_array_equal(handle.read_raw(slice(0, 18, 4))[0], tok[0:18:4])
    with pytest.raises(StoreError, match="row ids"):
        ro.read_tokens([18])
    assert ShardRowReader.for_array(tmp_path / "s" / "pooled") is None  # not sharded: zarr path


def test_damaged_shard_index_is_refused_by_fast_reader(tmp_path):
    make_store(tmp_path / "s")
    shard = tmp_path / "s" / "tokens" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    store = FeatureStore.open(tmp_path / "s")
    store.read_tokens([0])  # other shards unaffected
    with pytest.raises(StoreError, match="index checksum"):
        store.read_tokens([5])


CRASH = """
import os, sys
from pathlib import Path
from morphcache.testing.stores import make_chunk
from morphcache.store.feature_store import FeatureStore
store = FeatureStore.open(sys.argv[1], "a")
FeatureStore._mark_done = lambda self, c, checksum: os._exit(17)  # die between data and progress
store.write_chunk(1, *make_chunk(store.spec, 1))
"""


def test_crash_between_data_and_progress_leaves_chunk_missing_and_it_is_redone(tmp_path):
    spec = make_spec(n_images=6)
    store = FeatureStore.create(tmp_path / "s", spec, make_image_table(6))
    store.write_chunk(0, *make_chunk(spec, 0))
    proc = run_py(CRASH, str(tmp_path / "s"))
    assert proc.returncode == 17, proc.stderr
    store = FeatureStore.open(tmp_path / "s", "a")
    # the data of chunk 1 reached disk, but the chunk is not done
    assert (tmp_path / "s" / "tokens" / "c" / "1" / "0" / "0").exists()
    assert store.missing_chunks() == [1, 2]
    assert 2 not in store.ok_rows() // 2 and 1 * 2 not in store.ok_images()
    report = verify_store(store, show_progress=False)
    assert sorted(report.problems) == [1, 2]
    for c in store.missing_chunks():  # resume
        store.write_chunk(c, *make_chunk(spec, c))
    assert store.is_complete() and verify_store(store, show_progress=False).ok


WRITER = """
import sys
from morphcache.testing.stores import make_chunk
from morphcache.store.feature_store import FeatureStore
store = FeatureStore.open(sys.argv[1], "a")
for c in map(int, sys.argv[2].split(",")):
    store.write_chunk(c, *make_chunk(store.spec, c, skipped=(5,)))
"""


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_four_processes_on_disjoint_chunks_equal_one_process(tmp_path, dtype):
    spec = make_spec(n_images=15, dtype=dtype, chunk_images=2, T=16, D=32)  # 8 chunks, the last one partial
    one = FeatureStore.create(tmp_path / "one", spec, make_image_table(15))
    for c in range(one.n_chunks):
        one.write_chunk(c, *make_chunk(spec, c, skipped=(5,)))
    FeatureStore.create(tmp_path / "four", spec, make_image_table(15))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "four"), ",".join(map(str, chunks))], env=env)
             for chunks in ([0, 4], [1, 5], [2, 6], [3, 7])]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    files_one = sorted(str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*") if p.is_file())
    files_four = sorted(str(p.relative_to(tmp_path / "four")) for p in (tmp_path / "four").rglob("*") if p.is_file())
    assert files_one == files_four and any(f.startswith("tokens/c/") for f in files_one)
    for f in files_one:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "four" / f).read_bytes(), f
    assert verify_store(FeatureStore.open(tmp_path / "four"), show_progress=False).ok


def test_spec_mismatch_is_refused_and_names_the_field(tmp_path):
    make_store(tmp_path / "s")
    before = tree_hash(tmp_path / "s")
    with pytest.raises(SpecMismatchError, match=r"\bseed\b"):
        FeatureStore.create(tmp_path / "s", make_spec(seed=1), make_image_table(6))
    with pytest.raises(SpecMismatchError, match=r"views_per_image"):
        FeatureStore.create(tmp_path / "s", make_spec(views=3), make_image_table(6))
    with pytest.raises(SpecMismatchError, match=r"teacher\.dim"):
        FeatureStore.create(tmp_path / "s", make_spec(D=16), make_image_table(6))
    same = FeatureStore.create(tmp_path / "s", make_spec(), make_image_table(6))  # identical spec: opened for append
    assert same.mode == "a" and same.is_complete()
    assert tree_hash(tmp_path / "s") == before


def test_bad_writes_are_refused_without_touching_the_store(tmp_path):
    store = make_store(tmp_path / "s", complete=False)
    spec = store.spec
    before = tree_hash(tmp_path / "s")
    good = make_chunk(spec, 0)
    for c in (3, -1, 99, 1.0, True):
        with pytest.raises(StoreError, match=r"s: chunk .* outside the store \(valid: 0\.\.2\)"):
            store.write_chunk(c, *good)
    with pytest.raises(StoreError, match="tokens has shape"):
        store.write_chunk(2, good[0][:, :3], *good[1:])
    bad = good[0].copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(StoreError, match="NaN"):
        store.write_chunk(2, bad, *good[1:])
    with pytest.raises(StoreError, match="read-only"):
        FeatureStore.open(tmp_path / "s", "r").write_chunk(2, *good)
    assert tree_hash(tmp_path / "s") == before and store.missing_chunks() == [2]


PLAIN = """
import sys, json
import numpy as np
import zarr, dask.array as da
g = zarr.open_group(sys.argv[1], mode="r")
tok = da.from_zarr(g["tokens"])
if "scales" in g:
    tok = tok.astype("float32") * da.from_zarr(g["scales"]).astype("float32")[..., None]
out = {"tokens": tok.astype("float32").compute(), "pooled": da.from_zarr(g["pooled"]).compute(),
       "views": da.from_zarr(g["views"]).compute(), "progress": g["progress"][:],
       "status": g["images/status"][:], "path": np.asarray(g["images/path"][:]).astype(object).astype(str)}
assert "morphcache" not in sys.modules, "must not import morphcache"
np.savez(sys.argv[2], **out)
print(json.dumps(dict(g.attrs)["morphcache"]["dtype"]))
"""


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_plain_zarr_and_dask_read_what_the_api_returns(tmp_path, dtype):
    store = make_store(tmp_path / "s", n_images=5, dtype=dtype, complete=False, skipped=(1,))
    proc = subprocess.run([sys.executable, "-c", PLAIN, str(tmp_path / "s"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == dtype
    got = np.load(tmp_path / "out.npz")
    store = FeatureStore.open(tmp_path / "s")
    np.testing.assert_array_equal(got["tokens"], store.read_tokens(slice(None)).numpy())
    np.testing.assert_array_equal(got["pooled"].astype(np.float32), store.read_pooled(slice(None)))
    np.testing.assert_array_equal(got["views"], store.read_views(slice(None)))
    np.testing.assert_array_equal(got["progress"], store.progress())
    np.testing.assert_array_equal(got["status"], store.image_status())
    assert got["path"].tolist() == store.image_table().path.tolist()


def test_dask_and_xarray_views(tmp_path):
    store = make_store(tmp_path / "s", n_images=5, chunk_images=2)
    arrays = store.to_dask()
    assert arrays["tokens"].chunks[0] == (4, 4, 2)  # one block per work chunk
    np.testing.assert_array_equal(arrays["tokens"].compute(), store.read_tokens_numpy(slice(None)))
    ds = store.to_xarray()
    assert ds["tokens"].dims == ("view", "token", "channel")
    assert ds["tokens"].shape == (10, 16, 32)
    assert ds["image"].values.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ds["token_col"].values[:5].tolist() == [0, 1, 2, 3, 0]
    np.testing.assert_array_equal(ds["tokens"].isel(view=7).values, store.read_tokens_numpy([7])[0])
    assert ds["status"].values.tolist() == [0] * 10


def test_pickled_store_reopens(tmp_path):
    store = make_store(tmp_path / "s")
    store.read_tokens([0, 5])  # populate the shard handle cache
    clone = pickle.loads(pickle.dumps(FeatureStore.open(tmp_path / "s")))
    assert clone.mode == "r"
    np.testing.assert_array_equal(clone.read_tokens_numpy([3, 1]), store.read_tokens_numpy([3, 1]))


def test_threaded_large_reads_equal_zarr_and_keep_descriptors_bounded(tmp_path):
    """Whole-shard reads over several shards take the threaded path; results equal zarr's, and the descriptor
    cache never exceeds its bound once reads finish."""
    store = make_store(tmp_path / "s", n_images=192, views=2, chunk_images=32, T=4, D=8)
    ro = FeatureStore.open(tmp_path / "s")
    reader = ro._reader("tokens")
    assert reader is not None
    reader.threads, reader.open_shards = 2, 2
    q, scales = ro.read_raw(slice(None))
    assert np.array_equal(q, np.asarray(zarr.open_array(str(tmp_path / "s" / "tokens"), mode="r")[:]))
    assert reader._pool is not None  # the threaded path ran
    assert len(reader._cache) <= 2 and reader._active == 0
    rows = np.random.default_rng(0).permutation(ro.n_rows)[:100]
    assert np.array_equal(ro.read_raw(rows)[0], q[rows])
    del store


def test_dense_shards_are_memory_mapped_and_read_exactly(tmp_path):
    """Complete uncompressed shards are gathered from a memory map; shards with omitted (all-fill) inner chunks,
    e.g. a skipped image's zero rows, fall back to per-row reads. Both equal zarr's reading."""
    make_store(tmp_path / "s", n_images=12, views=2, dtype="int8", chunk_images=4, T=4, D=8, skipped=(5,))
    ro = FeatureStore.open(tmp_path / "s")
    rows = np.random.default_rng(1).permutation(ro.n_rows)
    q, scales = ro.read_raw(rows)
    ref = np.asarray(zarr.open_array(str(tmp_path / "s" / "tokens"), mode="r")[:])
    assert np.array_equal(q, ref[rows])
    dense = ro._reader("tokens")._dense
    assert dense[0] is not None and dense[2] is not None  # complete shards: mapped
    assert ref[10:12].any() == False and dense[1] is None  # noqa: E712 - image 5's rows are zero: fallback path


@pytest.mark.parametrize("path", ["gather", "per_row", "per_row_threaded"])
def test_gather_any_order_with_repeats_into_given_buffers(tmp_path, path):
    """Batch-order reads (no sort) over mapped shards, a shard with fill rows (per-row fallback) and the partial
    last shard equal zarr's, through each copy path, into fresh arrays and into caller buffers."""
    make_store(tmp_path / "s", n_images=13, views=2, dtype="int8", chunk_images=4, T=4, D=8, skipped=(5,))
    ro = FeatureStore.open(tmp_path / "s")
    reader = ro._reader("tokens")
    if path != "gather":
        reader.per_row_copy_min_bytes = 0  # every row one memcpy
    if path == "per_row_threaded":
        reader.threads, reader.parallel_min_bytes = 2, 0
    ref = np.asarray(zarr.open_array(str(tmp_path / "s" / "tokens"), mode="r")[:])
    ref_s = np.asarray(zarr.open_array(str(tmp_path / "s" / "scales"), mode="r")[:])
    rng = np.random.default_rng(2)
    rows = np.concatenate([rng.permutation(ro.n_rows), [25, 0, 25, 11, 11]])  # any order, repeats
    q, s = ro.read_raw(rows)
    assert np.array_equal(q, ref[rows]) and np.array_equal(s, ref_s[rows])
    assert reader._dense[0] is not None and reader._dense[1] is None  # mapped and fallback shards both ran
    assert reader._dense[3].shape[0] == 2  # the last shard ends early (26 rows): its 2 rows are mapped too
    buf = (np.full((rows.size, 4, 8), 99, np.int8), np.zeros((rows.size, 4), np.float16))
    q2, s2 = ro.read_raw(rows, out=buf)
    assert q2 is buf[0] and s2 is buf[1]
    assert np.array_equal(buf[0], ref[rows]) and np.array_equal(buf[1], ref_s[rows])
    if path == "per_row_threaded":
        assert reader._pool is not None


def test_read_raw_refuses_a_wrong_output_buffer(tmp_path):
    make_store(tmp_path / "s")
    ro = FeatureStore.open(tmp_path / "s")
    with pytest.raises(ValueError, match=r"tokens: output buffer must be .*int8.*\(3, 16, 32\)"):
        ro.read_raw([0, 1, 2], out=(np.empty((3, 16, 32), np.float32), np.empty((3, 16), np.float16)))
    with pytest.raises(ValueError, match="scales: output buffer"):
        ro.read_raw([0, 1, 2], out=(np.empty((3, 16, 32), np.int8), np.empty((2, 16), np.float16)))


def test_errors_are_also_the_matching_builtins(tmp_path):
    from morphcache.errors import BadImageError, ConfigError, MorphcacheError

    with pytest.raises(FileNotFoundError) as info:
        FeatureStore.open(tmp_path / "absent.zarr")
    assert isinstance(info.value, MorphcacheError) and "no such store" in str(info.value)
    assert issubclass(ConfigError, ValueError) and issubclass(BadImageError, ValueError)
    assert issubclass(SpecMismatchError, ValueError)


def test_reader_fallback_to_zarr_is_logged(tmp_path, caplog):
    import json
    import logging

    from morphcache.store.shard_reader import ShardRowReader

    array_dir = tmp_path / "arr"
    array_dir.mkdir()
    (array_dir / "zarr.json").write_text(json.dumps({"shape": [4, 2], "codecs": [{"name": "bytes"}]}))
    with caplog.at_level(logging.WARNING, logger="morphcache.store.shard_reader"):
        assert ShardRowReader.for_array(array_dir) is None
    assert "through zarr" in caplog.text and str(array_dir) in caplog.text
