"""Training-stage throughput: is the cached, DALI-fed student step as fast as the student alone?

Measures, for a ViT-S/16 student at 112 px (7x7 grid) with a ViT-B/16-sized teacher at 112 px (timm
``vit_base_patch16_224`` with random weights, seeded as extraction does; random weights cost the same):

(a) ceiling: the DTM student step (forward, backward, clip, AdamW) on in-memory tensors of the batch's shapes;
(b) ``morphcache train`` from a real extracted store through the DALI loader (cached targets);
(c) the same command with ``--teacher-online`` (the teacher runs on every batch, rendered at its size);
(d) step times of token-wise, MAE and LUT against DTM on in-memory tensors;
(e) (b) from a store extracted from the same images packed into WebDataset tar shards (the loader reads members
    by (shard, offset)).

Goals: (b)/(a) >= 0.90, (b)/(c) >= 2.0, DTM <= 5% over token-wise, (e)/(b) >= 0.95. Steady-state step times are medians over
steps after a warm-up (the first steps include DALI worker start-up); the machine is shared, so the ratios use the
*fastest* steady-state step of each measurement (least disturbed by other processes) and medians are reported too.
Writes ``benchmarks/results/bench_train.json``.
Run: ``python benchmarks/bench_train.py [--quick]`` (about 3-5 minutes on 2 cores).
``--tar-only`` runs only (b) vs (e), alternately twice, plus the loader's per-sample read path
(``ViewSource.sample``) of both stores, and writes ``benchmarks/results/bench_train_tar.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "bench_train.json"
STUDENT, TEACHER, SIZE, BATCH = "vit_small_patch16_224", "timm:vit_base_patch16_224", 112, 16


def make_images(root: Path, n: int) -> None:
    """``n`` 240x320 JPEGs (smooth textures + a square): realistic decode cost, no download."""
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:240, 0:320]
    for i in range(n):
        img = np.stack([127 + 100 * np.sin(xx * rng.uniform(0.01, 0.2) + yy * rng.uniform(0.01, 0.2) + rng.uniform(0, 6))
                        for _ in range(3)], axis=-1)
        t, l = rng.integers(0, 180), rng.integers(0, 260)
        img[t : t + 60, l : l + 60] = rng.uniform(0, 255, 3)
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / f"im{i:03d}.jpg", quality=90)


def in_memory_step_times(objective_name: str, steps: int, warmup: int = 2) -> list[float]:
    """Seconds per optimizer step of ``objective_name`` on random in-memory tensors (bf16 autocast)."""
    from morphcache.schemas import RunConfig
    from morphcache.train.masking import build_block_mask_generator
    from morphcache.train.objectives import build_objective
    from morphcache.train.student import create_student

    config = RunConfig(store="-", model=STUDENT, objective=objective_name, batch_size=BATCH)
    torch.manual_seed(0)
    student = create_student(STUDENT, SIZE, 768, config.layer_scale, config.drop_path)
    objective = build_objective(objective_name, config, student, 768, student.grid)
    optimizer = torch.optim.AdamW(objective.param_groups(config.weight_decay), lr=1e-4)
    masker = build_block_mask_generator(config, student.grid)
    g = torch.Generator().manual_seed(0)
    batch = {"images": torch.randn(BATCH, 3, SIZE, SIZE, generator=g),
             "targets": torch.randn(BATCH, student.num_tokens, 768, generator=g),
             "images2": torch.randn(BATCH, 3, SIZE, SIZE, generator=g)}
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch["rng"] = np.random.default_rng((0, i))  # MAE / LUT masks
        batch["mask"] = masker.batch(BATCH, np.random.default_rng((0, i)))
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = objective(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.trainable_parameters(), 3.0)
        optimizer.step()
        objective.after_step(i, warmup + steps)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _stats(times: list[float]) -> dict:
    best, med = min(times), statistics.median(times)
    return {"step_s_min": best, "step_s_median": med, "images_per_s": BATCH / best, "images_per_s_median": BATCH / med,
            "steps_timed": len(times)}


def cli_step_times(store: Path, run: Path, steps: int, online: bool, warmup: int = 2) -> dict:
    """Run ``morphcache train`` and read its steady-state step times from metrics.jsonl."""
    from morphcache.cli import main

    argv = ["train", "--store", str(store), "--out", str(run), "--model", STUDENT, "--objective", "dtm",
            "--epochs", "100", "--batch-size", str(BATCH), "--max-steps", str(warmup + steps), "--loader", "dali",
            "--workers", "2", "--no-tensorboard"] + (["--teacher-online"] if online else [])
    if main(argv) != 0:
        raise SystemExit(f"morphcache train failed: {argv}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run / "summary.json").read_text())
    data_s = [r["data_s"] for r in records[warmup:]]
    return {**_stats([r["step_s"] for r in records[warmup:]]), "data_s_median": statistics.median(data_s),
            "summary_images_per_s_incl_startup": summary["images_per_s"], "setup_seconds": summary["setup_seconds"]}


def view_source_rate(store: Path, repeats: int = 5) -> float:
    """Samples per second of the DALI loader's per-sample callable (canonical bytes + view row), best of
    ``repeats`` passes over every servable row (in-process, no DALI)."""
    from morphcache.store.feature_store import FeatureStore
    from morphcache.train.loader import ViewSource
    from morphcache.train.sampler import EpochSampler

    rows = FeatureStore.open(store).ok_rows()
    sampler = EpochSampler(rows, 2, batch_size=BATCH, seed=0)
    source = ViewSource(str(store), sampler)
    n = len(rows) - len(rows) % BATCH
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for g in range(n):
            source.sample(g)
        best = min(best, time.perf_counter() - t0)
    return n / best


def tar_only(args, steps: int) -> int:
    """Reduced run: cached DALI training from a loose-file store (b) vs a tar-shard store (e)."""
    from _tar_shards import pack_shards
    from morphcache.extract.pipeline import ExtractOptions, run_extraction

    out: dict = {"student": STUDENT, "teacher": TEACHER, "img_size": SIZE, "batch_size": BATCH, "steps": steps,
                 "threads": torch.get_num_threads(),
                 "cpu_load_at_start": list(map(float, open("/proc/loadavg").read().split()[:3]))}
    with tempfile.TemporaryDirectory(prefix="bench_train_tar_") as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", 32)
        pattern = pack_shards(tmp / "images", tmp / "shards", per_shard=8)
        for kind, data in (("files", str(tmp / "images")), ("tar", pattern)):
            run_extraction(ExtractOptions(data=data, out=str(tmp / f"store_{kind}"), teacher=TEACHER, views=2,
                                          image_size=SIZE, batch_size=BATCH, chunk_images=8, precision="bf16"))
        runs: dict[str, list[dict]] = {"files": [], "tar": []}
        for rep in range(2):
            for kind in ("files", "tar"):
                runs[kind].append(cli_step_times(tmp / f"store_{kind}", tmp / f"run_{kind}{rep}", steps, online=False))
        reads = {}
        for rep in range(2):
            for kind in ("files", "tar"):
                reads[kind] = max(reads.get(kind, 0.0), view_source_rate(tmp / f"store_{kind}"))
    b = max(r["images_per_s"] for r in runs["files"])
    e = max(r["images_per_s"] for r in runs["tar"])
    out.update({
        "b_cached_dali_files": runs["files"], "e_cached_dali_tar": runs["tar"],
        "e_over_b": e / b,
        "view_source_samples_per_s": reads, "view_source_tar_over_files": reads["tar"] / reads["files"],
        "goals": {"e_over_b>=0.95": e / b >= 0.95},
        "cpu_load_at_end": list(map(float, open("/proc/loadavg").read().split()[:3])),
    })
    path = RESULTS.with_name("bench_train_tar.json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tar-only", action="store_true", help="reduced run: loose-file vs tar-shard store only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 3 if args.quick else 10
    if args.tar_only:
        return tar_only(args, steps)
    from morphcache.extract.pipeline import ExtractOptions, run_extraction

    out: dict = {"student": STUDENT, "teacher": f"{TEACHER} (random weights, ViT-B/16 cost)", "img_size": SIZE,
                 "batch_size": BATCH, "precision": "bf16 autocast", "threads": torch.get_num_threads(),
                 "cpu_load_at_start": list(map(float, open("/proc/loadavg").read().split()[:3]))}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        tmp = Path(tmp)
        make_images(tmp / "images", 32)
        t0 = time.perf_counter()
        run_extraction(ExtractOptions(data=str(tmp / "images"), out=str(tmp / "store"), teacher=TEACHER, views=2,
                                      image_size=SIZE, batch_size=BATCH, chunk_images=8, precision="bf16"))
        out["extract_seconds_64_views"] = time.perf_counter() - t0
        from _tar_shards import pack_shards

        run_extraction(ExtractOptions(data=pack_shards(tmp / "images", tmp / "shards", per_shard=8),
                                      out=str(tmp / "store_tar"), teacher=TEACHER, views=2, image_size=SIZE,
                                      batch_size=BATCH, chunk_images=8, precision="bf16"))

        ceiling = in_memory_step_times("dtm", steps)  # measured before and after (b), (c): load drifts
        out["b_cached_dali"] = cli_step_times(tmp / "store", tmp / "run_cached", steps, online=False)
        out["c_teacher_online"] = cli_step_times(tmp / "store", tmp / "run_online", steps, online=True)
        out["e_cached_dali_tar"] = cli_step_times(tmp / "store_tar", tmp / "run_tar", steps, online=False)
        out["a_in_memory_dtm"] = _stats(ceiling + in_memory_step_times("dtm", steps))
        for name in ("tokenwise", "mae", "lut"):
            out[f"d_in_memory_{name}"] = _stats(in_memory_step_times(name, steps))
    a, b, c = (out[k]["images_per_s"] for k in ("a_in_memory_dtm", "b_cached_dali", "c_teacher_online"))
    tok = out["d_in_memory_tokenwise"]["step_s_min"]
    dtm = out["a_in_memory_dtm"]["step_s_min"]
    out["ratios"] = {
        "b_over_a": b / a, "b_over_c": b / c, "e_over_b": out["e_cached_dali_tar"]["images_per_s"] / b,
        # share of a cached step spent waiting for the loader: the rest of the gap to (a) is CPU contention
        # (DALI decode and render share the 2 cores with the student here; on a GPU machine they overlap)
        "b_data_wait_fraction": out["b_cached_dali"]["data_s_median"] / out["b_cached_dali"]["step_s_median"],
        "dtm_overhead_vs_tokenwise": dtm / tok - 1.0,
        "mae_step_vs_dtm": out["d_in_memory_mae"]["step_s_min"] / dtm,
        "lut_step_vs_dtm": out["d_in_memory_lut"]["step_s_min"] / dtm,
    }
    out["goals"] = {"b_over_a>=0.90": b / a >= 0.90, "b_over_c>=2.0": b / c >= 2.0,
                    "dtm_overhead<=5%": dtm / tok - 1.0 <= 0.05,
                    "e_over_b>=0.95": out["e_cached_dali_tar"]["images_per_s"] / b >= 0.95}
    out["cpu_load_at_end"] = list(map(float, open("/proc/loadavg").read().split()[:3]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
