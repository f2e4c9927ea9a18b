"""``store pilot`` on generated stores whose cosines and DTM-removed variance are known in closed form."""

import json
from pathlib import Path

import numpy as np
import pytest

from morphcache.cli import main
from morphcache.schemas import N_VIEW_PARAMS
from morphcache.store.feature_store import FeatureStore
from morphcache.store.image_table import STATUS_OK
from morphcache.store.pilot import PilotConfig, run_pilot

from morphcache.testing.stores import make_image_table, make_spec

T, D, A = 16, 32, 2.0  # 4x4 grid; pair vectors u_j = A * basis_j


def pair_tokens(eps: float) -> np.ndarray:
    """(T, D): tokens 2j and 2j+1 (horizontal neighbours on the 4x4 grid) are u_j +- eps * e_j, with all u_j and
    e_j orthonormal directions, so cos(2j, 2j+1) = (A^2 - eps^2) / (A^2 + eps^2) and every other pair has cos 0."""
    x = np.zeros((T, D), dtype=np.float32)
    for j in range(T // 2):
        x[2 * j, j] = x[2 * j + 1, j] = A
        x[2 * j, 8 + j], x[2 * j + 1, 8 + j] = eps, -eps
    return x


def write_store(path, per_view, labels=None, n_images=6, views=2, chunk_images=2):
    """A complete float16 store (exact for these values) whose view r holds ``per_view(r)`` tokens (T, D)."""
    spec = make_spec(n_images, views, "float16", chunk_images, T, D)
    images = make_image_table(n_images)
    if labels is not None:
        images.label = np.asarray(labels, dtype=np.int32)
    store = FeatureStore.create(Path(path), spec, images)
    for c in range(store.n_chunks):
        a, b = store.chunk_row_range(c)
        ia, ib = store.chunk_image_range(c)
        tokens = np.stack([per_view(r) for r in range(a, b)])
        store.write_chunk(c, tokens, np.zeros((b - a, D), np.float32), np.zeros((b - a, N_VIEW_PARAMS), np.float32),
                          np.full(ib - ia, STATUS_OK, np.uint8))
    return FeatureStore.open(path)


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_pilot_known_cosines_and_removed_share(tmp_path, eps):
    store = write_store(tmp_path / "s", lambda r: pair_tokens(eps))
    # one bipartite iteration (K = 1) of at most 8 merges: each even token's best partner is its pair (cos c > 0,
    # everything else 0), so merging n pairs removes n * 2 eps^2 of the view's within-image variance
    cfg = PilotConfig(max_merge=8, max_iters=1, rule="exact", cases=6, seed=3, classify_images=6)
    json_path, png_path, pilot = run_pilot(store, tmp_path / "out", cfg)
    c = (A**2 - eps**2) / (A**2 + eps**2)
    # 4-neighbour pairs: 12 horizontal (8 inside a pair) + 12 vertical (none inside a pair)
    assert pilot["neighbour_cosine"] == pytest.approx(8 * c / 24, abs=1e-5)
    # rounded distance 1 also holds the 18 diagonal pairs (sqrt 2 rounds to 1)
    assert pilot["cosine_by_distance"]["1"] == pytest.approx(8 * c / 42, abs=1e-5)
    assert pilot["cosine_by_distance"]["2"] == pytest.approx(0.0, abs=1e-6)
    within = T * (A**2 + eps**2) - 2 * A**2  # sum |x|^2 - T |mean|^2, |mean|^2 = 2 A^2 / T
    x = pair_tokens(eps)
    assert within == pytest.approx(float(np.square(x - x.mean(0)).sum()))
    assert pilot["rows"] == 12 and len(pilot["cases"]) == 6
    assert any(case["n"] > 0 for case in pilot["cases"])
    for case in pilot["cases"]:
        assert case["removed_share"] == pytest.approx(case["n"] * 2 * eps**2 / within, abs=1e-6)
    assert pilot["removed_share"] == pytest.approx(np.mean([cs["n"] for cs in pilot["cases"]]) * 2 * eps**2 / within,
                                                   abs=1e-6)
    assert "unlikely to change these targets much" in pilot["verdict"]
    assert json.loads(json_path.read_text())["removed_share"] == pytest.approx(pilot["removed_share"])
    assert png_path.stat().st_size > 0


def test_pilot_removed_share_with_unequal_pairs(tmp_path):
    # tokens 2j and 2j+1 share a strong pair direction plus opposite-signed copies of a random vector: one
    # iteration merges the n pairs of highest cosine, each removing |x_2j - x_2j+1|^2 / 2 of the variance
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((T // 2, D)).astype(np.float16).astype(np.float32)

    def per_view(r):
        x = pair_tokens(0.0) * 10.0  # strong pair directions keep the matching inside pairs
        x[0::2] += noise
        x[1::2] -= noise
        return x

    store = write_store(tmp_path / "s", per_view)
    cfg = PilotConfig(max_merge=8, max_iters=1, rule="exact", cases=4, seed=1, classify_images=6)
    _, _, pilot = run_pilot(store, tmp_path / "out", cfg)
    x = store.read_tokens_numpy(np.array([0]))[0].astype(np.float64)  # as stored (float16)
    within = float(np.square(x - x.mean(0)).sum())
    per_pair = np.square(x[0::2] - x[1::2]).sum(axis=1) / 2  # |x_2j - mean_j|^2 + |x_2j+1 - mean_j|^2
    for case in pilot["cases"]:
        # merged pairs are those with the highest pair cosine: computed here from the tokens themselves
        cos = np.array([x[2 * j] @ x[2 * j + 1] / np.linalg.norm(x[2 * j]) / np.linalg.norm(x[2 * j + 1])
                        for j in range(T // 2)])
        top = np.argsort(-cos, kind="stable")[: case["n"]]
        assert case["removed_share"] == pytest.approx(per_pair[top].sum() / within, rel=1e-4)


def test_pilot_token_classification_on_a_labelled_store(tmp_path):
    labels = [i % 2 for i in range(8)]

    def per_view(r):
        x = np.random.default_rng(r).standard_normal((T, D)).astype(np.float32) * 0.1
        x[:, 20 + labels[r // 2]] += 3.0  # every token carries its image's class
        return x

    store = write_store(tmp_path / "s", per_view, labels=labels, n_images=8)
    cfg = PilotConfig(max_merge=None, max_iters=4, cases=3, classify_images=8)
    _, _, pilot = run_pilot(store, tmp_path / "out", cfg)
    cls = pilot["token_classification"]
    assert cls["train_images"] == 4 and cls["test_images"] == 4 and cls["tokens_per_image"] == T
    assert cls["raw_top1"] == pytest.approx(100.0)
    assert cls["morphed_top1"] == pytest.approx(100.0)  # morphing only averages tokens of one image
    assert cls["raw_correct_tokens_per_image"] == pytest.approx(T)


def test_pilot_command_and_unlabelled_store(tmp_path, capsys):
    write_store(tmp_path / "s", lambda r: pair_tokens(0.5), labels=[-1] * 6)
    code = main(["store", "pilot", str(tmp_path / "s"), "--out", str(tmp_path / "o"), "--max-merge", "8",
                 "--max-iters", "1", "--cases", "2"])
    out = capsys.readouterr().out
    assert code == 0
    pilot = json.loads((tmp_path / "o" / "pilot.json").read_text())
    assert pilot["token_classification"] is None
    assert pilot["config"]["max_merge"] == 8 and pilot["config"]["rule"] == "released"
    assert "DTM is unlikely" in out and (tmp_path / "o" / "pilot.png").is_file()


def test_pilot_bad_run_config_is_one_line(tmp_path, capsys):
    write_store(tmp_path / "s", lambda r: pair_tokens(0.5))
    code = main(["store", "pilot", str(tmp_path / "s"), "--run-config", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert code == 2 and "--run-config" in err and len(err.strip().splitlines()) == 1
