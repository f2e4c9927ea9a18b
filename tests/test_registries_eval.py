"""The losses, datasets and protocols registries: a toy loss, a toy dataset and a toy protocol registered from inside
a test are used end to end without editing any morphcache module, and unknown names give the registry's one-line
error listing what is registered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import morphcache.evaluate.protocols  # noqa: F401  (the built-ins these tests list)
import morphcache.evaluate.seg_datasets  # noqa: F401
import morphcache.train.losses.regression  # noqa: F401
from morphcache import registries
from morphcache.cli import main
from morphcache.errors import ConfigError
from morphcache.evaluate.dataset_loading import load_dataset
from morphcache.evaluate.datasets import DatasetSplits, parse_dataset_spec
from morphcache.evaluate.results import EvalSettings, load_results, run_protocols
from morphcache.schemas import RunConfig
from morphcache.testing.registries import scratch_registries

TINY = "random:vit_tiny_patch16_224"


@pytest.fixture()
def scratch_registry():
    """Registrations made inside the test vanish after it (built-ins imported first, so none is lost)."""
    with scratch_registries():
        yield


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _colours(spec: str, image_size: int = 224) -> DatasetSplits:
    """Toy dataset: flat 12x12 images, class 0 dark red, class 1 light blue, with a little noise;
    ``?train=N&test=M`` sets the split sizes (default 8 / 4)."""
    _, _, params = parse_dataset_spec(spec)
    rng = np.random.default_rng(params.get("seed", 0))

    def split(n):
        labels = np.arange(n) % 2
        base = np.where(labels[:, None] == 0, [[120, 10, 10]], [[80, 160, 240]])
        images = base[:, None, None, :] + rng.integers(-5, 6, size=(n, 12, 12, 3))
        return images.clip(0, 255).astype(np.uint8), labels.astype(np.int64)

    (xtr, ytr), (xte, yte) = split(params.get("train", 8)), split(params.get("test", 4))
    return DatasetSplits(xtr, ytr, xte, yte, ("red", "blue"), spec)


def test_builtins_are_registered():
    assert registries.names(registries.losses) == ["cosine", "l1", "l2", "smooth_l1"]
    assert {"knn", "linear", "finetune", "segment"} <= set(registries.names(registries.protocols))
    assert {"fashion-mnist", "digits", "cifar10", "cifar100", "folder", "ade20k", "seg-folder"} <= set(
        registries.names(registries.datasets))


def test_unknown_names_list_what_is_registered(capsys):
    with pytest.raises(ConfigError, match=r"^unknown loss 'huber'; registered: cosine, l1, l2, smooth_l1$"):
        registries.lookup(registries.losses, "huber")
    with pytest.raises(ConfigError, match=r"^unknown dataset 'mnist'; registered: ade20k, cifar10, .*seg-folder$"):
        load_dataset("mnist:/x?train=3")
    with pytest.raises(ConfigError, match=r"^unknown protocol 'knnn'; registered: finetune, knn, linear, segment"):
        run_protocols(["knn", "knnn"], backbone=None, data=None)  # every name is checked before anything runs
    with pytest.raises(ValueError, match="not a registered loss; use one of cosine, l1, l2, smooth_l1"):
        RunConfig(store="s", loss="huber")
    assert main(["train", "--store", "s", "--loss", "huber", "--print-config", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("morphcache: error: --loss: not a registered loss; use one of "
                                       "cosine, l1, l2, smooth_l1 (got 'huber')\n")


def test_a_toy_loss_trains_through_run_config(tmp_path, scratch_registry):
    from morphcache.testing.teacher_stores import build_teacher_store
    from morphcache.train.loop import run_training

    calls = []

    @registries.losses.register("toy_abs_max")
    def toy_abs_max(pred, target, *, beta):
        """Largest absolute channel error per token: (B, T, D) -> (B, T)."""
        calls.append((pred.dtype, tuple(pred.shape), beta))
        return (pred - target).abs().amax(dim=-1)

    store = build_teacher_store(tmp_path / "store", n_images=4, views=1, chunk_images=4).path
    cfg = RunConfig(store=str(store), model="vit_tiny_patch16", objective="tokenwise", loss="toy_abs_max",
                    smooth_l1_beta=1.5, batch_size=2, mask_min_block=4, epochs=1, max_steps=2, loader="torch",
                    workers=0, precision="fp32", warmup_steps=0)
    summary = run_training(cfg, tmp_path / "run", tensorboard=False)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    assert len(calls) == 2 and all(dtype == torch.float32 and beta == 1.5 for dtype, _, beta in calls)
    assert calls[0][1][0] == 2  # (B, T, D) with B = the batch


def test_a_toy_dataset_runs_knn_from_the_cli(tmp_path, scratch_registry):
    registries.datasets.register("toy-colours", func=_colours)
    results = tmp_path / "eval.jsonl"
    assert main(["eval", "knn", "-c", TINY, "--img-size", "32", "-d", "toy-colours?train=10&test=6", "--k", "3",
                 "--device", "cpu", "--results", str(results)]) == 0
    (row,) = load_results(results)
    assert row["dataset"] == "toy-colours?train=10&test=6" and row["config"]["n_train"] == 10
    assert row["config"]["n_classes"] == 2 and row["metrics"]["top1"] == 100.0  # flat colours: trivial


def test_a_toy_protocol_runs_through_run_protocols_and_shares_features(scratch_registry):
    from morphcache.evaluate.backbones import load_backbone
    from morphcache.evaluate.protocols import ProtocolResult, base_config, frozen_features

    seen = {}

    @registries.protocols.register("nearest_mean")
    def nearest_mean(backbone, data, settings, shared):
        """Nearest class mean of the frozen features (cosine)."""
        train_f, test_f = frozen_features(backbone, data, settings, shared)
        seen["features"] = shared["features"]
        means = torch.stack([train_f[torch.as_tensor(data.train_labels) == c].mean(0) for c in range(data.n_classes)])
        sims = torch.nn.functional.normalize(test_f, dim=1) @ torch.nn.functional.normalize(means, dim=1).T
        top1 = float((sims.argmax(1) == torch.as_tensor(data.test_labels)).float().mean() * 100)
        return ProtocolResult({**base_config(backbone, data, settings), "metric": "cosine"}, {"top1": top1},
                              {"means": means})

    backbone = load_backbone(TINY, 32)
    data = _colours("toy?train=8&test=4")
    artifacts: dict = {}
    rows = run_protocols(["knn", "nearest_mean"], backbone, data, EvalSettings(batch_size=8), artifacts=artifacts)
    assert [r["protocol"] for r in rows] == ["knn", "nearest_mean"]
    assert rows[1]["config"]["metric"] == "cosine" and rows[1]["metrics"]["top1"] == 100.0
    assert artifacts["nearest_mean"]["means"].shape[0] == 2 and artifacts["knn"] == {}
    assert "means" not in rows[1]  # artifacts never reach the row
    # the protocol ran on the features k-NN extracted (the backbone ran once)
    assert seen["features"][0].shape == (8, rows[0]["config"]["feature_dim"])
    # and the transfer command accepts it by name
    from morphcache.config_cli import validate_config
    from morphcache.evaluate.config import TransferEvalOptions

    opts = validate_config(TransferEvalOptions, {"checkpoint": TINY, "dataset": "digits", "to": "digits?train=5",
                                                 "protocols": "nearest_mean"})
    assert opts.protocols == ["nearest_mean"]
