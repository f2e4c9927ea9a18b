"""store replay-check (DALI and PIL renderers, a tampered cache fails) and store show (views + token PCA map)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from morphcache.cli import main

ARGS = ["--teacher", "timm:vit_tiny_patch16_224", "--image-size", "64", "--views", "2", "--batch-size", "4", "--threads", "1",
        "--chunk-images", "4", "--seed", "2"]


def write_images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(4)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(40, 96, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * (3 + i)) % 256, (yy * 4) % 256, ((xx - yy) * 2 + 40 * i) % 256], -1)
        Image.fromarray(np.clip(img + rng.integers(-10, 10, img.shape), 0, 255).astype(np.uint8)).save(
            folder / f"r{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    data = write_images(root / "imgs", 8)
    out = {}
    for dtype in ("float16", "int8"):
        out[dtype] = root / dtype
        assert main(["extract", "--data", str(data), "--out", str(out[dtype]), *ARGS, "--dtype", dtype]) == 0
    return out


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_replay_check_meets_goal(stores, dtype, tmp_path, capsys):
    report_path = tmp_path / "replay.json"
    assert main(["store", "replay-check", str(stores[dtype]), "--rows", "10", "--json", str(report_path)]) == 0
    line = capsys.readouterr().out
    assert "per-token cosine mean" in line and ": ok" in line
    report = json.loads(report_path.read_text())
    assert report["rows"] == 10 and report["tokens"] == 10 * 16 and report["renderer"] == "dali"
    assert report["passed"] and report["p1"] >= report["goal"] == (0.999 if dtype == "float16" else 0.998)
    assert report["min"] <= report["p1"] <= report["mean"] <= 1.0 + 1e-9


def test_replay_check_with_pil_fallback_reports_its_fidelity(stores, tmp_path):
    report_path = tmp_path / "pil.json"
    rc = main(["store", "replay-check", str(stores["float16"]), "--rows", "6", "--renderer", "pil",
               "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    assert report["renderer"] == "pil" and report["rows"] == 6
    assert rc == (0 if report["passed"] else 1)
    assert 0.9 < report["mean"] <= 1.0 + 1e-9  # close to DALI, measured rather than assumed exact


def test_replay_check_fails_on_a_tampered_cache(stores, tmp_path, capsys):
    import shutil

    import zarr

    copy = tmp_path / "tampered"
    shutil.copytree(stores["float16"], copy)
    tokens = zarr.open_group(str(copy), mode="r+")["tokens"]
    x = np.asarray(tokens[0:8])
    tokens[0:8] = (x + np.random.default_rng(0).normal(0, 2.0, x.shape)).astype(np.float16)  # chunk 0 corrupted
    rc = main(["store", "replay-check", str(copy), "--rows", "16"])
    assert rc == 1 and "BELOW GOAL" in capsys.readouterr().out


def test_show_draws_views_and_pca_maps(stores, tmp_path):
    out = tmp_path / "show.png"
    assert main(["store", "show", str(stores["int8"]), "--rows", "6", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 400 and im.height > 150
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas


def test_pca_rgb_maps_tokens_to_unit_colours():
    from morphcache.extract.show import pca_rgb

    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(3, 16, 8))
    tokens[1, 5] = tokens[0, 2]  # identical tokens get identical colours, across panels
    rgb = pca_rgb(tokens)
    assert rgb.shape == (3, 16, 3) and rgb.dtype == np.float32
    np.testing.assert_allclose(rgb.reshape(-1, 3).min(0), 0, atol=1e-6)
    np.testing.assert_allclose(rgb.reshape(-1, 3).max(0), 1, atol=1e-6)
    np.testing.assert_allclose(rgb[1, 5], rgb[0, 2], atol=1e-6)
    # the first channel is the direction of largest variance
    spread = tokens.reshape(-1, 8) - tokens.reshape(-1, 8).mean(0)
    top = np.linalg.svd(spread, full_matrices=False)[2][0]
    assert abs(np.corrcoef(rgb.reshape(-1, 3)[:, 0], spread @ top)[0, 1]) > 0.999
