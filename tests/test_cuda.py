"""GPU paths (marker ``cuda``): skipped cleanly where torch sees no CUDA device, run by ``benchmarks/gpu_check.py``.

Covered with a GPU: DALI GPU render vs CPU render (skipped without DALI); the teacher on CUDA in bf16 / fp16 vs
fp32 and vs CPU; ``morphcache extract`` on CUDA with the auto device and precision, then ``store replay-check`` on
CUDA (same device, and a CPU-extracted store replayed on CUDA); the pinned :class:`TargetPrefetcher` with CUDA
events over many steps; a few training steps of every objective on CUDA through the torch loader (and the DALI
loader when DALI is installed); DTM membership on CUDA equal to CPU; LUT with SyncBatchNorm under DDP in a
one-process NCCL group. Random-weight small models and generated images only (no network, no weights).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from morphcache.cli import main

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device (torch sees none)")]


def _dali() -> bool:
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):
        return False


DALI = _dali()
TEACHER = ["--teacher", "timm:vit_tiny_patch16_224", "--image-size", "64", "--views", "2", "--batch-size", "8",
           "--chunk-images", "4", "--seed", "3", "--renderer", "pil", "--workers", "2"]
OBJECTIVES = ["dtm", "tokenwise", "mae", "lut", "mae+dtm"]


def _write_images(folder: Path, n: int, fmt: str = "png") -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(48, 120, 2))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * (3 + i)) % 256, (yy * 5) % 256, ((xx - yy) * 2 + 30 * i) % 256], -1)
        img = np.clip(img + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"g{i:02d}.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))
    return folder


@pytest.fixture(scope="module")
def cuda_store(tmp_path_factory):
    """A store extracted on CUDA with --device/--precision auto (bf16) and the PIL renderer."""
    root = tmp_path_factory.mktemp("cuda_store")
    data = _write_images(root / "imgs", 16)
    assert main(["extract", "--data", str(data), "--out", str(root / "store"), *TEACHER]) == 0
    return root / "store"


def _spec(path):
    from morphcache.store.feature_store import FeatureStore

    return FeatureStore.open(path, "r").spec


def test_extract_auto_chooses_cuda_bf16_and_records_it(cuda_store):
    spec = _spec(cuda_store)
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert spec.teacher.precision == expected


def test_replay_check_on_cuda_meets_goal(cuda_store, tmp_path):
    report = tmp_path / "r.json"
    rc = main(["store", "replay-check", str(cuda_store), "--rows", "24", "--renderer", "pil", "--batch-size", "8",
               "--json", str(report)])
    got = json.loads(report.read_text())
    assert got["device"].startswith("cuda") and got["renderer"] == "pil"
    assert rc == 0, got


def test_cpu_store_replayed_on_cuda(tmp_path):
    """Cross-device replay: extracted on the CPU in fp32, replayed on CUDA in fp32 and in bf16."""
    data = _write_images(tmp_path / "imgs", 8)
    store = tmp_path / "cpu_store"
    assert main(["extract", "--data", str(data), "--out", str(store), *TEACHER, "--device", "cpu", "--threads", "2"]) == 0
    assert _spec(store).teacher.precision == "fp32"
    out = {}
    for precision in ("fp32", "bf16"):
        path = tmp_path / f"{precision}.json"
        main(["store", "replay-check", str(store), "--rows", "16", "--renderer", "pil", "--device", "cuda",
              "--precision", precision, "--batch-size", "8", "--json", str(path)])
        out[precision] = json.loads(path.read_text())
    assert out["fp32"]["passed"], out["fp32"]  # the same maths on another device keeps replay fidelity
    assert out["bf16"]["mean"] > 0.99, out["bf16"]


@pytest.mark.skipif(not DALI, reason="NVIDIA DALI is not installed")
def test_dali_gpu_render_matches_cpu_render(tmp_path):
    from morphcache.extract.images import load_canonical_bytes
    from morphcache.extract.render_dali import DaliRenderer
    from morphcache.extract.views import ViewSampler
    from morphcache.schemas import AugmentSpec

    data = _write_images(tmp_path / "imgs", 8, fmt="jpg")
    encoded, rows = [], []
    sampler = ViewSampler(AugmentSpec(), 0)
    for i, f in enumerate(sorted(data.iterdir())):
        enc, (h, w) = load_canonical_bytes(f)
        encoded.append(enc)
        rows.append(sampler.row(i, 0, h, w))
    rows = np.stack(rows).astype(np.float32)
    kw = dict(sizes=(64,), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), batch_size=8, num_threads=2)
    cpu = DaliRenderer(**kw).render(encoded, rows)[0]
    gpu = DaliRenderer(**kw, device="gpu", device_id=0).render(encoded, rows)[0]
    assert gpu.is_cuda
    diff = (gpu.cpu() - cpu).abs() * 255.0  # in 8-bit pixel levels
    assert float(diff.mean()) < 1.0 and float(diff.quantile(0.99)) < 8.0, (float(diff.mean()), float(diff.max()))


def test_teacher_on_cuda_low_precision_vs_fp32():
    from morphcache.extract.teachers import load_teacher
    from morphcache.store.quantize import token_cosine

    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    cpu = load_teacher("timm", "vit_tiny_patch16_224", None, image_size=64).forward_tokens(x)[0].numpy()
    tokens = {}
    for precision in ("fp32", "bf16", "fp16"):
        teacher = load_teacher("timm", "vit_tiny_patch16_224", None, image_size=64, device="cuda", precision=precision)
        tok, pooled = teacher.forward_tokens(x)
        assert tok.is_cuda and tok.dtype == torch.float32 and torch.isfinite(tok).all()
        tokens[precision] = tok.cpu().numpy()
    assert token_cosine(tokens["fp32"], cpu).min() > 0.999  # same weights (seeded init) on both devices
    assert token_cosine(tokens["fp16"], tokens["fp32"]).mean() > 0.999
    assert token_cosine(tokens["bf16"], tokens["fp32"]).mean() > 0.99


def test_target_prefetcher_pinned_cuda_equals_read_tokens(tmp_path):
    """No staging-buffer reuse race: every step's CUDA targets equal read_tokens of its rows, with GPU work queued
    between steps (the next read overwrites the pinned buffer while copies may still be in flight)."""
    from morphcache.train.sampler import EpochSampler
    from morphcache.train.targets import TargetPrefetcher
    from morphcache.testing.stores import make_store

    store = make_store(tmp_path / "s", n_images=64, views=2, chunk_images=8, T=64, D=96, seed=1)
    sampler = EpochSampler(store.ok_rows(), 2, batch_size=8, seed=0)
    pf = TargetPrefetcher(store, sampler, depth=3, device="cuda")
    assert pf._stage is None
    busy = torch.randn(2048, 2048, device="cuda")
    try:
        for g in range(3 * sampler.steps_per_epoch + 5):
            rows = sampler.batch_rows(g)
            got = pf.get(g, rows)
            assert got.is_cuda
            busy = busy @ busy * 1e-3  # keep the stream busy so copies overlap the prefetch thread
            assert torch.equal(got.cpu(), store.read_tokens(rows)), f"micro-batch {g}"
        assert pf._stage[0].is_pinned()
    finally:
        pf.close()


def _train(store, out, objective, loader, **kw):
    from morphcache.schemas import RunConfig
    from morphcache.train.loop import run_training

    cfg = RunConfig(store=str(store), model="vit_tiny_patch16", objective=objective, batch_size=4, max_steps=2,
                    mask_min_block=4, dtm_max_merge=8, dtm_max_iters=3, loader=loader, workers=kw.pop("workers", 0),
                    precision="bf16", base_lr=0.01, **kw)
    return run_training(cfg, out, tensorboard=False, show_progress=False, device="cuda")


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_steps_on_cuda_torch_loader(cuda_store, tmp_path, objective):
    summary = _train(cuda_store, tmp_path / objective, objective, "torch")
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])
    ckpt = torch.load(tmp_path / objective / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


@pytest.mark.skipif(not DALI, reason="NVIDIA DALI is not installed")
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_training_steps_on_cuda_dali_loader(cuda_store, tmp_path, objective):
    summary = _train(cuda_store, tmp_path / objective, objective, "dali", workers=1)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])


def test_online_teacher_on_cuda(cuda_store, tmp_path):
    summary = _train(cuda_store, tmp_path / "online", "dtm", "torch", teacher_online=True)
    assert summary["steps"] == 2 and np.isfinite(summary["final_loss"])


def test_dtm_membership_on_cuda_equals_cpu():
    from morphcache.train.dtm import dtm_membership, morph

    # integer-valued tokens: every dot product, norm and division is exact or correctly rounded on both devices,
    # so a difference in membership is a real CPU / CUDA divergence, not float summation order
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-8, 9, (16, 196, 64), generator=g).float()
    for n, k in ((30, 4), (150, 14), (0, 1), (195, 14)):
        cpu = dtm_membership(x, n, k)
        gpu = dtm_membership(x.cuda(), n, k)
        assert gpu.is_cuda and torch.equal(gpu.cpu(), cpu), (n, k)
        assert torch.allclose(morph(x.cuda(), gpu).cpu(), morph(x, cpu), atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lut_with_syncbatchnorm_one_process_nccl():
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from morphcache.schemas import RunConfig
    from morphcache.train.objectives import build_objective
    from morphcache.train.student import create_student

    if not dist.is_nccl_available():
        pytest.skip("this torch build has no NCCL")
    cfg = RunConfig(store="unused", model="vit_tiny_patch16", objective="lut", batch_size=8)
    torch.manual_seed(0)
    student = create_student("vit_tiny_patch16", 64, 32, 0.1, 0.0, patch_size=16)
    objective = build_objective("lut", cfg, student, 32, (4, 4)).cuda()
    n_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in objective.modules())
    assert n_bn > 0, "LUT has BatchNorms to synchronise"
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(objective)
        assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn
        model = DistributedDataParallel(synced, device_ids=[0])
        opt = torch.optim.AdamW(synced.trainable_parameters(), lr=1e-3)
        x = torch.randn(8, 3, 64, 64, device="cuda")
        for step in range(3):
            batch = {"images": x, "images2": torch.flip(x, dims=[-1]), "rng": np.random.default_rng(step)}
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss, metrics = model(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            synced.after_step(step, 3)
            assert torch.isfinite(loss)
        bn = next(m for m in synced.modules() if isinstance(m, torch.nn.SyncBatchNorm))
        assert int(bn.num_batches_tracked) > 0
    finally:
        dist.destroy_process_group()


def test_cuda_request_works_and_auto_resolves_to_cuda():
    from morphcache.device import resolve_device, resolve_precision

    assert resolve_device("auto") == "cuda"
    assert resolve_device("cuda:0") == "cuda:0"
    assert resolve_precision("auto", "cuda") in ("bf16", "fp16")
    assert os.environ.get("CUDA_VISIBLE_DEVICES", "0") != ""


def test_host_copies_overlap_and_land_in_order():
    """Extraction's pinned side-stream copies: every batch's rows land in the chunk arrays exactly (the pinned
    slots alternate, so a slot is reused only after its copy was written out)."""
    from morphcache.extract.engine import HostCopies

    copies = HostCopies("cuda")
    tokens = np.zeros((40, 16, 8), np.float32)
    pooled = np.zeros((40, 8), np.float32)
    expect_t, expect_p = np.zeros_like(tokens), np.zeros_like(pooled)
    busy = torch.randn(1024, 1024, device="cuda")
    for b in range(5):
        tok = torch.randn(8, 16, 8, device="cuda")
        pool = torch.randn(8, 8, device="cuda")
        busy = busy @ busy * 1e-3  # queued work after the batch, as the next forward would be
        n = 8 if b < 4 else 5
        rows = np.arange(b * 8, b * 8 + n)[::-1].copy()
        expect_t[rows], expect_p[rows] = tok[:n].cpu().numpy(), pool[:n].cpu().numpy()
        copies.put(tok, pool, n, tokens, pooled, rows)
        del tok, pool  # their memory may be reused by the allocator only after the copy
    copies.flush()
    assert np.array_equal(tokens, expect_t) and np.array_equal(pooled, expect_p)
