"""morphcache.evaluate: datasets, backbones, k-NN, linear probe, fine-tuning, transfer, results, CLI."""

from __future__ import annotations

import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from morphcache.errors import MorphcacheError
from morphcache.evaluate.backbones import load_backbone
from morphcache.evaluate.dataset_loading import load_dataset
from morphcache.evaluate.datasets import fashion_mnist_dir, stratified_subset
from morphcache.evaluate.features import extract_features, prepare_images
from morphcache.evaluate.finetune import FinetuneConfig, finetune, param_groups
from morphcache.evaluate.knn import knn_evaluate, knn_scores, topk_accuracy
from morphcache.evaluate.linear_probe import LinearProbeConfig, linear_probe_evaluate, train_linear_probe
from morphcache.evaluate.results import append_result, load_results

TINY = "vit_tiny_patch16_224"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------- datasets
def test_digits_split_and_stratified_subsample():
    full = load_dataset("digits")
    assert full.train_images.shape == (1347, 8, 8, 3) and full.test_images.shape == (450, 8, 8, 3)
    assert full.train_images.dtype == np.uint8 and full.train_images.max() == 255
    assert np.array_equal(full.train_images[..., 0], full.train_images[..., 2])  # grayscale expanded
    sub = load_dataset("digits?train=100&test=50")
    assert len(sub.train_labels) == 100 and len(sub.test_labels) == 50
    assert np.bincount(sub.train_labels).tolist() == [10] * 10
    assert sub.n_classes == 10 and sub.name == "digits?train=100&test=50"
    again = load_dataset("digits?train=100&test=50")
    assert np.array_equal(sub.train_images, again.train_images)  # seeded
    other = load_dataset("digits?train=100&test=50&seed=3")
    assert not np.array_equal(sub.train_images, other.train_images)


def test_stratified_subset_keeps_proportions():
    labels = np.array([0] * 90 + [1] * 10)
    keep = stratified_subset(labels, 20, seed=0)
    assert len(np.unique(keep)) == 20 and np.bincount(labels[keep]).tolist() == [18, 2]
    assert np.array_equal(stratified_subset(labels, 500, seed=0), np.arange(100))


def _write_idx(path: Path, arr: np.ndarray, gz: bool) -> None:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_folder(tmp_path, gz):
    rng = np.random.default_rng(0)
    tr, te = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    _write_idx(tmp_path / "train-images-idx3-ubyte", tr, gz)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(30) % 10, gz)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", te, gz)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10), gz)
    d = load_dataset(f"fashion-mnist:{tmp_path}")
    assert d.train_images.shape == (30, 28, 28, 3) and d.test_images.shape == (10, 28, 28, 3)
    assert np.array_equal(d.train_images[..., 1], tr) and d.test_labels.tolist() == list(range(10))
    assert d.classes[9] == "Ankle boot"


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(MorphcacheError, match="does not exist"):
        load_dataset(f"fashion-mnist:{tmp_path / 'nope'}")
    with pytest.raises(MorphcacheError, match="train-images-idx3-ubyte"):
        load_dataset(f"fashion-mnist:{tmp_path}")
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + (5).to_bytes(4, "big") * 3 + b"x")
    with pytest.raises(MorphcacheError, match="truncated"):
        load_dataset(f"fashion-mnist:{tmp_path}")


@pytest.mark.skipif(not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file()
                    and not (fashion_mnist_dir() / "train-images-idx3-ubyte").is_file(),
                    reason="Fashion-MNIST not found where fashion_mnist_dir() points")
def test_fashion_mnist_system_copy():
    d = load_dataset("fashion-mnist?train=200&test=100")
    assert d.train_images.shape == (200, 28, 28, 3) and d.test_images.shape == (100, 28, 28, 3)
    assert np.bincount(d.train_labels).tolist() == [20] * 10 and d.n_classes == 10


def _make_folder(root: Path, n_per_class: int = 3, test_name: str = "val") -> None:
    rng = np.random.default_rng(0)
    for split in ("train", test_name):
        for ci, cls in enumerate(("cat", "dog")):
            (root / split / cls).mkdir(parents=True)
            for i in range(n_per_class):
                h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
                img = np.full((h, w, 3), 40 + 170 * ci, dtype=np.uint8)
                mode = "L" if i == 0 else "RGB"  # grayscale files are expanded to RGB
                Image.fromarray(img if mode == "RGB" else img[..., 0], mode).save(root / split / cls / f"{i}.png")
    (root / "train" / "notes.txt").write_text("ignored")


def test_image_folder(tmp_path):
    _make_folder(tmp_path)
    d = load_dataset(f"folder:{tmp_path}", image_size=16)
    assert d.classes == ("cat", "dog") and d.train_images.shape == (6, 16, 16, 3)
    assert d.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and d.test_images.shape == (6, 16, 16, 3)
    assert abs(int(d.train_images[0].mean()) - 40) <= 1 and abs(int(d.train_images[5].mean()) - 210) <= 1
    sub = load_dataset(f"folder:{tmp_path}?train=2&test=2", image_size=16)
    assert sorted(sub.train_labels.tolist()) == [0, 1] and len(sub.test_labels) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(MorphcacheError, match="train"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(MorphcacheError, match="test/ nor val/"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "test" / "zebra").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "test" / "zebra" / "z.png")
    with pytest.raises(MorphcacheError, match="zebra"):
        load_dataset(f"folder:{tmp_path}")


def _cifar_batch(n: int, labels_key: str, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    data[:, 0] = 7  # red channel of pixel (0, 0)
    data[:, 1024] = 9  # green channel of pixel (0, 0)
    return {b"data": data, labels_key.encode(): [i % 10 for i in range(n)]}


def test_cifar10_and_100_pickle_folders(tmp_path):
    c10 = tmp_path / "cifar-10-batches-py"
    c10.mkdir()
    for i in range(1, 6):
        (c10 / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(4, "labels", i), protocol=2))
    (c10 / "test_batch").write_bytes(pickle.dumps(_cifar_batch(3, "labels", 9), protocol=2))
    names = [f"c{i}".encode() for i in range(10)]
    (c10 / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    d = load_dataset(f"cifar10:{tmp_path}")  # finds the cifar-10-batches-py subfolder
    assert d.train_images.shape == (20, 32, 32, 3) and d.test_images.shape == (3, 32, 32, 3)
    assert d.train_images[0, 0, 0].tolist()[:2] == [7, 9] and d.classes[3] == "c3"
    c100 = tmp_path / "c100"
    c100.mkdir()
    (c100 / "train").write_bytes(pickle.dumps(_cifar_batch(6, "fine_labels", 1)))
    (c100 / "test").write_bytes(pickle.dumps(_cifar_batch(2, "fine_labels", 2)))
    d = load_dataset(f"cifar100:{c100}")
    assert d.n_classes == 100 and d.train_labels.tolist() == [0, 1, 2, 3, 4, 5]


def test_cifar_refuses_code_in_pickles_and_bad_specs(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(MorphcacheError, match="not a CIFAR python pickle"):
        load_dataset(f"cifar10:{tmp_path}")
    for spec, msg in [("cifar10", "needs a folder"), ("mnist", "unknown dataset"), ("digits?size=3", "unknown option"),
                      ("digits?train=x", "not an integer"), ("digits?train=0", "positive")]:
        with pytest.raises(MorphcacheError, match=msg) as info:
            load_dataset(spec)
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------------ k-NN
def test_knn_matches_hand_computed_vote():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[0.6, 0.8]])
    scores = knn_scores(train, labels, test, n_classes=2, k=2, temperature=0.5)
    # nearest two: [0, 1] (cos 0.8) and [0.8, 0.6] (cos 0.96), both label 1
    assert torch.allclose(scores, torch.tensor([[0.0, np.exp(0.8 / 0.5) + np.exp(0.96 / 0.5)]], dtype=torch.float32), rtol=1e-5)
    scores = knn_scores(train, labels, torch.tensor([[1.0, 0.1]]), n_classes=2, k=20, temperature=0.07)
    assert scores.argmax().item() == 0  # k clipped to 3; the one very close label-0 neighbour dominates


def test_knn_on_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 32, generator=g) * 3
    y_tr, y_te = torch.arange(300) % 6, torch.arange(120) % 6
    x_tr = centers[y_tr] + torch.randn(300, 32, generator=g)
    x_te = centers[y_te] + torch.randn(120, 32, generator=g)
    m = knn_evaluate(x_tr, y_tr.numpy(), x_te, y_te.numpy(), 6)
    assert m["top1"] > 97 and m["top5"] == 100.0
    shuffled = knn_evaluate(x_tr, y_tr[torch.randperm(300, generator=g)].numpy(), x_te, y_te.numpy(), 6)
    assert shuffled["top1"] < 50  # labels carry the signal, not the protocol


def test_topk_accuracy_reports_top5_only_above_five_classes():
    assert set(topk_accuracy(torch.eye(5), np.arange(5))) == {"top1"}
    assert topk_accuracy(torch.eye(6), np.arange(6)) == {"top1": 100.0, "top5": 100.0}


# ---------------------------------------------------------------------------------------- linear probe
def test_linear_probe_learns_separable_task():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 24, generator=g)
    x = torch.randn(1500, 24, generator=g)
    top2 = (x @ w.T).topk(2, dim=1)
    keep = (top2.values[:, 0] - top2.values[:, 1]) > 1.0  # linearly separable with a margin
    x, y = x[keep][:600] * 5 + 10, top2.indices[keep][:600, 0]  # offset and scale: BatchNorm must standardize
    assert len(y) == 600
    cfg = LinearProbeConfig(epochs=50, batch_size=64, lr=0.02)
    probe, losses = train_linear_probe(x[:400], y[:400].numpy(), 4, cfg)
    assert isinstance(probe[0], torch.nn.BatchNorm1d) and not probe[0].affine
    assert losses[-1] < losses[0] * 0.5
    m = linear_probe_evaluate(x[:400], y[:400].numpy(), x[400:], y[400:].numpy(), 4, cfg)
    assert m["top1"] > 95 and m["train_top1"] > 95


# ------------------------------------------------------------------------------------------- backbones
def _save_checkpoint(path: Path, img_size: int = 32) -> torch.nn.Module:
    import timm

    torch.manual_seed(3)
    model = timm.create_model(TINY, pretrained=False, num_classes=0, img_size=img_size).eval()
    torch.save({"model": model.state_dict(), "config": {"model": TINY, "store": "s"}, "target_dim": 8,
                "img_size": img_size, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, path)
    return model


@pytest.fixture
def student_loader(monkeypatch):
    """Use the real ``load_student_backbone``; only if it is missing, a minimal stand-in for these tests."""
    try:
        from morphcache.train.student import load_student_backbone  # noqa: F401
    except ImportError:
        import sys
        import types

        import timm

        def load(path):
            ck = torch.load(path, weights_only=True)
            m = timm.create_model(ck["config"]["model"], num_classes=0, img_size=ck["img_size"])
            m.load_state_dict(ck["model"])
            return m.eval(), {k: v for k, v in ck.items() if k != "model"}

        mod = types.ModuleType("morphcache.train.student")
        mod.load_student_backbone = load
        monkeypatch.setitem(sys.modules, "morphcache.train.student", mod)


def test_checkpoint_backbone_matches_timm_model(tmp_path, student_loader):
    model = _save_checkpoint(tmp_path / "ckpt.pt")
    bb = load_backbone(f"checkpoint:{tmp_path / 'ckpt.pt'}")
    assert (bb.kind, bb.img_size, bb.mean, bb.std) == ("checkpoint", 32, (0.5,) * 3, (0.25,) * 3)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = model.forward_features(x)
    assert torch.allclose(bb.tokens(x), ref[:, 1:], atol=1e-5) and bb.tokens(x).shape == (3, 4, 192)
    assert torch.allclose(bb.encode(x), torch.cat([ref[:, 0], ref[:, 1:].mean(1)], 1), atol=1e-5)
    bare = load_backbone(str(tmp_path / "ckpt.pt"), img_size=48, pooling="cls")  # bare path, resized input
    assert bare.img_size == 48 and bare.encode(torch.randn(2, 3, 48, 48)).shape == (2, 192)
    with pytest.raises(MorphcacheError, match="does not exist"):
        load_backbone(f"checkpoint:{tmp_path / 'missing.pt'}")


def test_random_and_teacher_backbones_and_bad_specs():
    a = load_backbone(f"random:{TINY}", img_size=32, pooling="mean")
    b = load_backbone(f"random:{TINY}", img_size=32, pooling="mean")
    x = torch.randn(2, 3, 32, 32)
    assert a.encode(x).shape == (2, 192) and torch.equal(a.encode(x), b.encode(x))  # seeded random weights
    t = load_backbone(f"teacher:timm:{TINY}", img_size=32)
    assert t.kind == "teacher" and t.encode(x).shape == (2, 192 * 2) and t.tokens(x).shape == (2, 4, 192)
    for spec in ("nonsense", f"random:not_a_model_{TINY}", "random:"):
        with pytest.raises(MorphcacheError):
            load_backbone(spec)


def test_features_resize_and_normalize():
    imgs = np.zeros((5, 8, 8, 3), np.uint8)
    imgs[..., 0] = 255
    x = prepare_images(imgs, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (5, 3, 16, 16)
    assert torch.allclose(x[:, 0], torch.ones(5, 16, 16)) and torch.allclose(x[:, 1], -torch.ones(5, 16, 16))
    bb = load_backbone(f"random:{TINY}", img_size=32)
    feats = extract_features(bb, load_dataset("digits?train=20&test=10").train_images, batch_size=7)
    assert feats.shape == (20, 384) and torch.isfinite(feats).all()


# ------------------------------------------------------------------------------------------- fine-tune
@pytest.mark.parametrize("spec", [f"random:{TINY}", f"teacher:timm:{TINY}"])
def test_finetune_steps_change_weights_and_leave_original_alone(spec):
    """Also for a teacher, whose module is frozen for feature extraction: the fine-tuned copy trains."""
    bb = load_backbone(spec, img_size=32, pooling="mean")
    before = {k: v.clone() for k, v in bb.module.state_dict().items()}
    data = load_dataset("digits?train=40&test=20")
    cfg = FinetuneConfig(batch_size=8, max_steps=2, lr=1e-3, warmup_fraction=0.0)
    res = finetune(bb, data, cfg)
    assert res.metrics["steps"] == 2 and len(res.losses) == 2 and 0 <= res.metrics["top1"] <= 100
    assert res.metrics["layer_decay_applied"] and res.metrics["drop_path_applied"]
    tuned = res.model.backbone.module.state_dict()
    assert not torch.equal(tuned["blocks.11.mlp.fc1.weight"], before["blocks.11.mlp.fc1.weight"])
    assert not torch.equal(tuned["patch_embed.proj.weight"], before["patch_embed.proj.weight"])
    assert all(torch.equal(v, before[k]) for k, v in bb.module.state_dict().items())  # caller's copy untouched
    dp = res.model.backbone.module.blocks
    assert dp[0].drop_path1.__class__.__name__ == "Identity" and abs(dp[11].drop_path1.drop_prob - 0.1) < 1e-9


def test_layer_decay_scales_rise_towards_the_head():
    from morphcache.evaluate.finetune import Classifier

    bb = load_backbone(f"random:{TINY}", img_size=32, pooling="mean")
    groups, layered = param_groups(Classifier(bb, 192, 3), FinetuneConfig(layer_decay=0.5))
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    m = bb.module
    assert layered
    assert scale[id(m.patch_embed.proj.weight)] < scale[id(m.blocks[0].attn.qkv.weight)] < \
        scale[id(m.blocks[11].attn.qkv.weight)] <= 1.0
    assert abs(scale[id(m.blocks[11].attn.qkv.weight)] / scale[id(m.blocks[10].attn.qkv.weight)] - 2.0) < 1e-6


# -------------------------------------------------------------------------------- results, transfer, CLI
def test_append_result_adds_version_and_timestamp(tmp_path):
    path = tmp_path / "sub" / "r.jsonl"
    append_result(path, {"protocol": "knn", "metrics": {"top1": np.float32(50.0)}})
    append_result(path, {"protocol": "linear", "metrics": {"top1": 60.0}, "timestamp": "t"})
    with open(path, "a") as f:
        f.write("not json\n")
    rows = load_results(path)
    assert [r["protocol"] for r in rows] == ["knn", "linear"] and rows[0]["metrics"]["top1"] == 50.0
    assert rows[0]["morphcache_version"] == "0.1.0" and rows[1]["timestamp"] == "t"


def test_cli_knn_random_reference_row(tmp_path, capsys):
    from morphcache.cli import main

    out = tmp_path / "eval.jsonl"
    code = main(["eval", "knn", "--checkpoint", f"random:{TINY}", "--img-size", "32",
                 "--dataset", "digits?train=100&test=50", "--results", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["protocol"] == "knn" and row["backbone"] == f"random:{TINY}"
    assert row["config"]["k"] == 20 and row["config"]["temperature"] == 0.07 and row["config"]["n_train"] == 100
    assert 10 < row["metrics"]["top1"] <= 100 and "timestamp" in row and "morphcache_version" in row
    assert "knn digits" in capsys.readouterr().out


def test_cli_checkpoint_default_results_in_run_dir_and_errors(tmp_path, student_loader, capsys):
    from morphcache.cli import main

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    _save_checkpoint(run / "checkpoints" / "last.pt")
    code = main(["eval", "linear", "-c", str(run / "checkpoints" / "last.pt"), "-d", "digits?train=60&test=30",
                 "--epochs", "3"])
    assert code == 0
    row = load_results(run / "eval.jsonl")[0]
    assert row["protocol"] == "linear" and row["config"]["epochs"] == 3 and row["backbone_info"]["img_size"] == 32
    assert main(["eval", "knn", "-c", str(tmp_path / "none.pt"), "-d", "digits"]) == 2
    assert main(["eval", "knn", "-c", f"random:{TINY}", "-d", "folder:/no/such"]) == 2
    err = capsys.readouterr().err
    assert "none.pt does not exist" in err and err.count("morphcache: error:") == 2


def test_cli_transfer_writes_source_and_target_rows(tmp_path):
    from morphcache.cli import main

    _make_folder(tmp_path / "pets", n_per_class=4, test_name="test")
    out = tmp_path / "r.jsonl"
    code = main(["eval", "transfer", "-c", f"random:{TINY}", "--img-size", "32", "-d", "digits?train=50&test=20",
                 "--to", f"folder:{tmp_path / 'pets'}", "--protocols", "knn,linear", "--results", str(out)])
    assert code == 0
    rows = load_results(out)
    assert [(r["protocol"], r.get("transfer_from")) for r in rows] == [
        ("knn", None), ("linear", None), ("knn", "digits?train=50&test=20"), ("linear", "digits?train=50&test=20")]
    assert rows[2]["config"]["n_classes"] == 2 and rows[2]["metrics"]["top1"] == 100.0  # flat colours: trivial


def test_a_size_larger_than_the_split_is_named_as_used(capsys):
    """digits has 1347 train / 450 test images: asking for 2000 / 1000 used all of them, but result rows and the
    demo's report named the sizes asked for (newcomer check, session 5)."""
    data = load_dataset("digits?train=2000&test=1000&seed=0")
    assert len(data.train_labels) == 1347 and len(data.test_labels) == 450
    assert data.name == "digits?train=1347&test=450&seed=0"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "train=2000 asks for more than the 1347 train images" in err[0]
    assert load_dataset("digits?train=100&test=1000").name == "digits?train=100&test=450"
