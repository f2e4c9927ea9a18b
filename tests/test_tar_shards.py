"""WebDataset tar shards as extraction input: discovery, the index, bad shards, exact replay, resume, scale-out.

Shards are written here with Python's ``tarfile`` from real photos (scikit-image), as img2dataset lays them out:
``<key>.jpg|png`` + ``<key>.cls`` (+ ``<key>.json``) per sample.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from morphcache.cli import main
from morphcache.errors import BadImageError, MorphcacheError
from morphcache.testing.stores import done_chunk_files, store_arrays

ARGS = ["--teacher", "timm:vit_tiny_patch16_224", "--image-size", "32", "--views", "2", "--batch-size", "4",
        "--threads", "1", "--chunk-images", "2", "--dtype", "int8", "--seed", "3"]
REPO = Path(__file__).resolve().parents[1]


def photo_samples(n: int) -> list[tuple[str, str, bytes, int]]:
    """``n`` (key, extension, encoded bytes, label) from scikit-image photos: alternating PNG and JPEG crops."""
    from skimage import data as skdata

    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.camera(), skdata.rocket()]
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        crop = img[(i * 13) % (h // 3):, (i * 7) % (w // 3):][::5, ::5]
        buf = io.BytesIO()
        ext = "jpg" if i % 2 else "png"
        Image.fromarray(np.ascontiguousarray(crop)).save(buf, format="JPEG" if ext == "jpg" else "PNG", quality=90)
        out.append((f"{i:06d}", ext, buf.getvalue(), i % 3))
    return out


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tf.addfile(info, io.BytesIO(data))
    return path


def sample_members(samples, json_label: bool = False) -> list[tuple[str, bytes]]:
    out = []
    for key, ext, data, label in samples:
        out.append((f"{key}.{ext}", data))
        out.append((f"{key}.cls", str(label).encode()))
        if json_label:
            out.append((f"{key}.json", json.dumps({"caption": "x", "species": f"class{label}"}).encode()))
    return out


def write_dataset(root: Path, n: int, per_shard: int, json_label: bool = False) -> tuple[Path, Path, list]:
    """The same ``n`` images as a folder (``root/folder``) and as shards ``root/shards/00000.tar``...."""
    samples = photo_samples(n)
    folder = root / "folder"
    folder.mkdir(parents=True, exist_ok=True)
    for key, ext, data, _ in samples:
        (folder / f"{key}.{ext}").write_bytes(data)
    shards = root / "shards"
    for s in range(0, n, per_shard):
        write_tar(shards / f"{s // per_shard:05d}.tar", sample_members(samples[s:s + per_shard], json_label))
    return folder, shards, samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tar"), 10, 4)


# ---------------------------------------------------------------------------------------------- manifest
def test_brace_pattern_folder_and_list_give_the_same_manifest(dataset, tmp_path):
    from morphcache.extract.manifest import build_manifest
    from morphcache.extract.tar_shards import TarImageTable

    folder, shards, samples = dataset
    listing = tmp_path / "shards.txt"
    listing.write_text("# shards\n" + "".join(f"{p}\n" for p in sorted(shards.glob("*.tar"))))
    tables = [build_manifest(src)[0] for src in (f"{shards}/{{00000..00002}}.tar", shards, listing)]
    for t in tables:
        assert isinstance(t, TarImageTable)
        assert t.path.tolist() == tables[0].path.tolist() and t.offset.tolist() == tables[0].offset.tolist()
    t = tables[0]
    assert t.shards == ["00000.tar", "00001.tar", "00002.tar"]
    assert t.path.tolist() == [f"{i // 4:05d}.tar/{k}.{e}" for i, (k, e, _, _) in enumerate(samples)]
    assert t.shard.tolist() == [i // 4 for i in range(10)] and t.label.tolist() == [s[3] for s in samples]
    assert (t.index_status == 0).all()
    folder_table, _ = build_manifest(folder)
    assert t.hash.tolist() == folder_table.hash.tolist()  # the member bytes are the file bytes
    assert t.height.tolist() == folder_table.height.tolist() and t.width.tolist() == folder_table.width.tolist()
    from morphcache.store.image_table import STATUS_MISSING

    gap, _ = build_manifest(f"{shards}/{{00000..00003}}.tar")  # a shard of the range is missing: one row names it
    assert gap.path.tolist()[-1] == "00003.tar" and gap.index_status[-1] == STATUS_MISSING and len(gap) == 11
    for i in (0, 5, 9):  # (offset, size) address the member's bytes exactly
        with open(shards / t.shards[t.shard[i]], "rb") as f:
            f.seek(int(t.offset[i]))
            assert f.read(int(t.member_size[i])) == samples[i][2]


def test_labels_from_a_json_field(tmp_path):
    from morphcache.extract.manifest import build_manifest

    _, shards, samples = write_dataset(tmp_path, 5, 5, json_label=True)
    table, _ = build_manifest(shards, label_key="species")
    assert table.class_names == ["class0", "class1", "class2"] and table.label.tolist() == [s[3] for s in samples]
    table, _ = build_manifest(shards, label_key="absent")
    assert table.label.tolist() == [-1] * 5
    with pytest.raises(MorphcacheError, match="--label-key species: only for tar shard input"):
        build_manifest(tmp_path / "folder", label_key="species")


def test_source_errors_are_one_line(tmp_path):
    from morphcache.extract.manifest import build_manifest

    with pytest.raises(MorphcacheError, match=r"none of the 3 tar shards exist"):
        build_manifest(f"{tmp_path}/{{0..2}}.tar")
    listing = tmp_path / "mixed.txt"
    write_tar(tmp_path / "a.tar", [("x.cls", b"1")])
    listing.write_text("a.tar\nb.jpg\n")
    with pytest.raises(MorphcacheError, match=r"b\.jpg is not a \.tar shard"):
        build_manifest(listing)
    with pytest.raises(MorphcacheError, match=r"no image samples found in 1 tar shard"):
        build_manifest(tmp_path / "a.tar")


# ---------------------------------------------------------------------------------------------- extraction
def test_folder_and_shards_give_identical_stores(dataset, tmp_path):
    """Same images, same order and seed: tokens, scales, pooled, views and image columns are bit-identical."""
    from morphcache.store.feature_store import FeatureStore

    folder, shards, _ = dataset
    a, b = tmp_path / "folder_store", tmp_path / "tar_store"
    assert main(["extract", "--data", str(folder), "--out", str(a), *ARGS]) == 0
    assert main(["extract", "--data", f"{shards}/{{00000..00002}}.tar", "--out", str(b), *ARGS]) == 0
    x, y = store_arrays(a), store_arrays(b)
    for name in ("tokens", "scales", "pooled", "views", "checksums", "images/hash", "images/size", "images/status"):
        assert x[name] == y[name], name
    assert {"images/shard", "images/offset", "images/member_size", "images/index_status", "shards/path",
            "shards/size"} <= set(y)  # plain zarr reads the tar columns
    store = FeatureStore.open(b)
    assert store.spec.image_source == "tar" and FeatureStore.open(a).spec.image_source == "files"
    assert store.is_complete() and store.image_table().shards == ["00000.tar", "00001.tar", "00002.tar"]


def bad_shards(root: Path) -> Path:
    """Shards covering every bad-shard case, plus good samples around them."""
    good = photo_samples(6)
    d = root / "bad"
    write_tar(d / "00000.tar", sample_members(good[:2]) + [("000100.jpg", b"this is text, not an image"),
                                                           ("000101.cls", b"1"),  # a sample with no image
                                                           ])
    dup = sample_members(good[2:3]) + [("000102.cls", b"2")] + sample_members(good[2:3])  # key 000002 again
    write_tar(d / "00001.tar", dup)
    (d / "00002.tar").write_bytes(b"")  # empty shard
    write_tar(d / "00003.tar", [])  # a valid tar with no members
    full = write_tar(root / "full.tar", sample_members(good[3:6]))
    with tarfile.open(full) as tf:
        m = tf.getmember("000005.jpg")
    (d / "00004.tar").write_bytes(full.read_bytes()[:m.offset_data + m.size // 2])  # cut inside its data
    (d / "00005.tar").write_bytes(full.read_bytes()[:m.offset_data - 512 + 100])  # cut inside its header
    return d


def test_bad_shards_are_skipped_with_shard_and_key_and_nothing_else_is_lost(tmp_path, capsys):
    from morphcache.extract.manifest import build_manifest
    from morphcache.store.feature_store import FeatureStore
    from morphcache.store.image_table import (STATUS_BAD_SHARD, STATUS_DUPLICATE_KEY, STATUS_NO_IMAGE,
                                              STATUS_NOT_IMAGE, STATUS_OK, STATUS_TRUNCATED)

    d = bad_shards(tmp_path)
    table, _ = build_manifest(d)
    expected = {
        "00000.tar/000000.png": STATUS_OK, "00000.tar/000001.jpg": STATUS_OK,
        "00000.tar/000100.jpg": STATUS_NOT_IMAGE, "00000.tar/000101": STATUS_NO_IMAGE,
        "00001.tar/000002.png": STATUS_OK, "00001.tar/000102": STATUS_NO_IMAGE,
        "DUP": STATUS_DUPLICATE_KEY,
        "00002.tar": STATUS_BAD_SHARD, "00003.tar": STATUS_BAD_SHARD,
        "00004.tar/000003.jpg": STATUS_OK, "00004.tar/000004.png": STATUS_OK, "00004.tar/000005.jpg": STATUS_TRUNCATED,
        "00005.tar/000003.jpg": STATUS_OK, "00005.tar/000004.png": STATUS_OK, "CUT": STATUS_TRUNCATED,
    }
    dup = [p for p in table.path.tolist() if p.startswith("00001.tar/") and "@" in p]
    assert len(dup) == 1 and dup[0].startswith("00001.tar/000002@")
    cut = [p for p in table.path.tolist() if p.startswith("00005.tar@")]
    assert len(cut) == 1
    expected = {{"DUP": dup[0], "CUT": cut[0]}.get(k, k): v for k, v in expected.items()}
    assert table.path.tolist() == list(expected)

    out = tmp_path / "skip"
    assert main(["extract", "--data", str(d), "--out", str(out), *ARGS]) == 0
    summary = capsys.readouterr().out
    assert "skipped images:" in summary and "duplicate key in shard 1" in summary and "empty or unreadable shard 2" in summary
    store = FeatureStore.open(out)
    assert store.is_complete()
    assert dict(zip(store.image_table().path.tolist(), store.image_status().tolist())) == expected
    ok = store.ok_images()
    assert [str(p) for p in store.image_table().path[ok]] == [k for k, v in expected.items() if v == STATUS_OK]
    tokens, _ = store.read_raw(store.ok_rows())
    assert np.abs(tokens.astype(np.int32)).sum(axis=(1, 2)).min() > 0  # every good sample has real tokens

    capsys.readouterr()
    rc = main(["extract", "--data", str(d), "--out", str(tmp_path / "fail"), *ARGS, "--on-bad-image", "fail"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[extract")]
    assert rc == 2 and len(err) == 1 and "00000.tar/000100.jpg: not an image" in err[0], err


def test_member_reads_go_through_the_canonical_bytes_and_hash_check(dataset, tmp_path):
    from morphcache.extract.images import load_canonical_bytes
    from morphcache.extract.manifest import build_manifest
    from morphcache.extract.stored_images import StoredImages

    folder, shards, samples = dataset
    table, root = build_manifest(shards)
    images = StoredImages(root, table)
    for i, (key, ext, _, _) in enumerate(samples):
        assert images.load(i) == load_canonical_bytes(folder / f"{key}.{ext}")
    bad = table.subset(slice(0, 2))
    bad.hash[1] = "0" * 32
    with pytest.raises(MorphcacheError, match=r"00000\.tar/000001\.jpg: tar member changed since the store was extracted"):
        StoredImages(root, bad).load(1)
    moved = StoredImages(tmp_path, table)  # shards not at the recorded root
    with pytest.raises(BadImageError, match=r"00000\.tar/000000\.png: missing file"):
        moved.load(0)
    import shutil

    shutil.copytree(shards, tmp_path / "elsewhere")  # --image-root: the shards moved, offsets still hold
    assert StoredImages(tmp_path / "elsewhere", table).load(9) == images.load(9)


def test_changed_shard_is_refused_with_one_line(dataset, tmp_path, capsys):
    import shutil

    _, shards, _ = dataset
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    out = tmp_path / "s"
    assert main(["extract", "--data", str(copy), "--out", str(out), *ARGS]) == 0
    capsys.readouterr()
    with open(copy / "00001.tar", "ab") as f:  # a shard rewritten with one more sample: its size changes
        f.write(b"\0" * 10240)
    assert main(["store", "replay-check", str(out), "--rows", "20"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "00001.tar: tar shard changed since the store was extracted" in err[0], err
    # same size, other bytes: the member hash catches it
    data = bytearray((copy / "00001.tar").read_bytes()[:-10240])
    data[-10240 - 600] ^= 0xFF  # inside the last member's data
    (copy / "00001.tar").write_bytes(bytes(data))
    from morphcache.extract.stored_images import StoredImages
    from morphcache.store.feature_store import FeatureStore

    images = StoredImages.from_store(FeatureStore.open(out))
    with pytest.raises(MorphcacheError, match="tar member changed since the store was extracted"):
        for i in range(len(images.images)):
            images.load(i)


# ---------------------------------------------------------------------------------------------- file handles
def test_shard_reader_keeps_at_most_max_open_files(tmp_path):
    from morphcache.extract.tar_shards import ShardReader

    paths = [tmp_path / f"{i}.bin" for i in range(20)]
    for i, p in enumerate(paths):
        p.write_bytes(bytes([i]) * 8)
    reader = ShardReader(max_open=3)
    for rep in range(2):
        for i, p in enumerate(paths):
            assert reader.pread(p, 2, 3) == bytes([i]) * 3
            assert reader.n_open <= 3
    reader.close()
    assert reader.n_open == 0


def test_thousands_of_shards_under_a_low_descriptor_limit(tmp_path):
    """400 shards, RLIMIT_NOFILE 40: indexing and random-access reads (default 64 handles kept) never fail."""
    samples = photo_samples(2)
    d = tmp_path / "many"
    for s in range(400):
        key, ext, data, label = samples[s % 2]
        write_tar(d / f"{s:05d}.tar", [(f"{s:06d}.{ext}", data), (f"{s:06d}.cls", str(label).encode())])
    script = textwrap.dedent(f"""
        import resource, random
        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
        from morphcache.extract.manifest import build_manifest
        from morphcache.extract.stored_images import StoredImages
        table, root = build_manifest({str(d)!r}, workers=4)
        images = StoredImages(root, table)
        order = list(range(len(table))) * 2
        random.Random(0).shuffle(order)
        for i in order:
            images.load(i, verify=False)
        print(len(table), images._tar.reader.n_open)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    n, n_open = map(int, res.stdout.split())
    assert n == 400 and 1 <= n_open < 40


# ---------------------------------------------------------------------------------------------- schema
def test_schema_2_store_specs_migrate_to_loose_files():
    from morphcache.schemas import StoreSpec, load_versioned
    from morphcache.schemas.specs import TeacherSpec

    teacher = TeacherSpec(kind="timm", name="x", image_size=32, patch_size=16, dim=8, pooled_dim=8,
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    doc = StoreSpec(teacher=teacher, views_per_image=2, n_images=4, chunk_images=2).model_dump(mode="json")
    doc["schema_version"] = 2
    del doc["image_source"]
    spec = load_versioned(StoreSpec, doc, source="old")
    assert spec.image_source == "files" and spec.schema_version >= 3


# ---------------------------------------------------------------------------------------------- scale-out, resume
@pytest.mark.slow
def test_shard_split_and_dask_match_one_process(dataset, tmp_path):
    _, shards, _ = dataset
    single, split, fanned = tmp_path / "single", tmp_path / "split", tmp_path / "dask"
    src = f"{shards}/{{00000..00002}}.tar"
    assert main(["extract", "--data", src, "--out", str(single), *ARGS]) == 0
    for i in range(2):
        assert main(["extract", "--data", src, "--out", str(split), *ARGS, "--shard", f"{i}/2"]) == 0
    assert main(["extract", "--data", src, "--out", str(fanned), *ARGS, "--dask", "local", "--dask-workers", "2"]) == 0
    a = store_arrays(single)
    for other in (split, fanned):
        b = store_arrays(other)
        assert sorted(a) == sorted(b)
        for name in a:
            assert a[name] == b[name], f"array {name} differs ({other.name})"


@pytest.mark.slow
def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path):
    samples = photo_samples(24)
    d = tmp_path / "shards"
    for s in range(0, 24, 6):
        write_tar(d / f"{s // 6:05d}.tar", sample_members(samples[s:s + 6]))
    args = [a if a != "2" or i != ARGS.index("--chunk-images") + 1 else "1" for i, a in enumerate(ARGS)]
    killed, ref = tmp_path / "killed", tmp_path / "ref"
    cmd = [sys.executable, "-m", "morphcache", "extract", "--data", str(d), "--out", str(killed), *args]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 240
    try:
        while done_chunk_files(killed) < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"extract ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    from morphcache.store.feature_store import FeatureStore

    n_done = FeatureStore.open(killed).n_chunks - len(FeatureStore.open(killed).missing_chunks())
    assert 3 <= n_done < 24, f"kill left {n_done} chunks done; the test needs a partial store"
    assert main(["extract", "--data", str(d), "--out", str(killed), *args]) == 0  # resume
    assert main(["extract", "--data", str(d), "--out", str(ref), *args]) == 0
    a, b = store_arrays(ref), store_arrays(killed)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name] == b[name], f"array {name} differs after resume"


# ---------------------------------------------------------------------------------------------- replay, training
@pytest.fixture(scope="module")
def tar_store(dataset, tmp_path_factory):
    _, shards, _ = dataset
    out = tmp_path_factory.mktemp("tarstore") / "store"
    assert main(["extract", "--data", str(shards), "--out", str(out), "--teacher", "timm:test_vit", "--image-size", "64",
                 "--views", "2", "--batch-size", "4", "--threads", "1", "--chunk-images", "4", "--seed", "1"]) == 0
    return out


def test_replay_check_and_show_from_a_shard_backed_store(tar_store, tmp_path, capsys):
    report = tmp_path / "replay.json"
    assert main(["store", "replay-check", str(tar_store), "--rows", "8", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["passed"]
    png = tmp_path / "show.png"
    assert main(["store", "show", str(tar_store), "--rows", "4", "--out", str(png)]) == 0
    assert Image.open(png).size[0] > 0


def test_training_reads_views_from_tar_shards(tar_store, tmp_path):
    from morphcache.store.feature_store import FeatureStore
    from morphcache.train.loader import ViewSource
    from morphcache.train.sampler import EpochSampler

    store = FeatureStore.open(tar_store)
    sampler = EpochSampler(store.ok_rows(), 2, batch_size=4, seed=0)
    row = sampler.sample_rows(0)[0]
    from morphcache.extract.stored_images import StoredImages

    expected = StoredImages.from_store(store).load(row // 2)[0]
    assert ViewSource(str(tar_store), sampler).sample(0)[0].tobytes() == expected
    run = tmp_path / "run"
    assert main(["train", "--store", str(tar_store), "--model", "vit_tiny_patch16", "--objective", "tokenwise",
                 "--epochs", "1", "--batch-size", "4", "--out", str(run), "--workers", "1", "--warmup-steps", "1",
                 "--mask-min-block", "4", "--loss", "l2"]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and np.all(np.isfinite(losses))  # 10 images / batch 4 = 2 full steps
    # the torch fallback loader reads the same bytes
    from morphcache.train.loader import LoaderOptions, RenderSpec
    from morphcache.train.torch_loader import TorchTrainLoader

    t = store.spec.teacher
    loader = TorchTrainLoader(LoaderOptions(store, sampler, RenderSpec(t.image_size, t.mean, t.std), workers=1))
    batch = next(iter(loader))
    loader.close()
    assert tuple(batch.images.shape) == (4, 3, 64, 64) and batch.rows.tolist() == sampler.batch_rows(0).tolist()
    # the report's token maps render the views from the shards too
    assert main(["report", str(run), "--out", str(tmp_path / "report"), "--images", "2"]) == 0
    assert (tmp_path / "report" / "tokens_run.png").is_file()
