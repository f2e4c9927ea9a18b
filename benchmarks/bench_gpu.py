"""GPU benchmarks: teacher ceiling, end-to-end extraction, rendering, cached vs live-teacher training, store reads.

Each part is short (tens of seconds on an H200) and returns a JSON-able dict; ``benchmarks/gpu_check.py`` runs each
part in its own subprocess under its own time limit, and this file runs alone too::

    python benchmarks/bench_gpu.py [--parts teacher,train_step,...] [--json OUT.json] [--quick]

Parts (ViT-B/16-size teacher = timm ``vit_base_patch16_224`` with random weights, seeded as extraction does; random
weights cost the same as trained ones; images are generated ImageNet-like JPEGs, about 500x375, quality 90):

- ``teacher``: the teacher alone on pre-rendered device batches (the ceiling), bf16 autocast, batch 256, images/s;
- ``teacher_compile``: the same with ``torch.compile`` of the teacher's forward (compile seconds reported);
- ``extract``: ``morphcache extract`` end to end (DALI with GPU decode when DALI is installed, else the PIL
  renderer, said in the JSON as ``renderer``), views/s and its ratio to the ceiling (goal 0.9 with DALI);
- ``render``: the renderer alone (DALI when installed, and the PIL fallback) in views/s per CPU thread count;
- ``replay``: ``store replay-check`` on CUDA of the extract part's store, and of a CPU-extracted store (cross-device);
- ``train_step``: the DTM training step from cached targets vs with the live teacher for ViT-S/16 and ViT-B/16
  students (goals 2.0x and 1.25x; FLOP bounds about 2.3x and 1.33x);
- ``train_store``: the student step with targets read from a real int8 store (pinned staging, CUDA dequantize)
  vs from in-memory device tensors (goal 0.9), and the store's read rate in bytes/s vs what the step rate needs.

Timings use CUDA events / synchronized wall clocks after warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TEACHER = "vit_base_patch16_224"
PARTS = ("teacher", "train_step", "extract", "replay", "train_store", "render", "teacher_compile")


def _cuda():
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu: torch sees no CUDA device; run benchmarks/gpu_check.py --dry-run instead")
    return torch


def environment() -> dict:
    """GPU, driver, torch / CUDA versions and what is installed (DALI, dask-cuda)."""
    import platform

    import torch

    from morphcache.extract.renderers import dali_available

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "dali": dali_available(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                   bf16=torch.cuda.is_bf16_supported())
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            out["driver"] = smi.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            out["driver"] = None
    return out


def _time_cuda(fn, warmup: int, iters: int) -> float:
    """Seconds per call of ``fn`` (CUDA events, after ``warmup`` calls)."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0 / iters


def _teacher(precision: str = "bf16", size: int = 224):
    from morphcache.extract.teachers import load_teacher

    return load_teacher("timm", TEACHER, None, image_size=size, device="cuda", precision=precision)


# ------------------------------------------------------------------------------------------------ teacher ceiling
def part_teacher(quick: bool = False, compile: bool = False) -> dict:
    """Teacher alone on device batches: images/s (bf16, batch 256)."""
    torch = _cuda()
    batch = 256
    teacher = _teacher("bf16")
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    out = {"model": TEACHER, "precision": "bf16", "batch": batch, "compile": compile}
    if compile:
        t0 = time.perf_counter()
        teacher._features = torch.compile(teacher._features)
        teacher.forward_tokens(x)
        torch.cuda.synchronize()
        out["compile_seconds"] = round(time.perf_counter() - t0, 1)
    sec = _time_cuda(lambda: teacher.forward_tokens(x), warmup=3, iters=5 if quick else 20)
    out["images_per_s"] = round(batch / sec, 1)
    out["ms_per_batch"] = round(sec * 1000, 2)
    return out


def part_teacher_compile(quick: bool = False) -> dict:
    return part_teacher(quick, compile=True)


# ------------------------------------------------------------------------------------------------ images
def make_jpegs(folder: Path, n: int, seed: int = 0) -> Path:
    """``n`` ImageNet-like JPEGs, 500x375 or 375x500, quality 90: smooth colour fields plus texture and a few
    shapes (realistic decode cost), generated (no download). Written by a process pool."""
    from concurrent.futures import ProcessPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        list(pool.map(_one_jpeg, [(folder, i, seed) for i in range(n)], chunksize=16))
    return folder


def _one_jpeg(args) -> None:
    from PIL import Image, ImageFilter

    folder, i, seed = args
    rng = np.random.default_rng([seed, i])
    w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 18, (h, w, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr).filter(ImageFilter.SMOOTH)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w - 60)), int(rng.integers(0, h - 60))
        img.paste(tuple(int(v) for v in rng.integers(0, 255, 3)), (x0, y0, x0 + int(rng.integers(20, 60)),
                                                                    y0 + int(rng.integers(20, 60))))
    img.save(folder / f"img{i:05d}.jpg", quality=90)


_DATA: dict = {}


def jpeg_folder(n: int) -> Path:
    """A cached folder of ``n`` generated JPEGs under the temp dir (shared by the parts of one process)."""
    if n not in _DATA:
        base = Path(os.environ.get("MORPHCACHE_BENCH_TMP") or tempfile.mkdtemp(prefix="mc_gpu_"))
        folder = base / f"jpegs{n}" / "class0"
        done = base / f"jpegs{n}.complete"  # outside the dataset folder (the manifest would list it)
        if not done.exists():  # another part's process may have made them already
            make_jpegs(folder, n)
            done.write_text("ok\n")
        _DATA[n] = folder.parent
    return _DATA[n]


def _morphcache(args: list[str], timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    p = subprocess.run([sys.executable, "-m", "morphcache", *args], capture_output=True, text=True, env=env,
                       timeout=timeout, cwd=str(ROOT))
    return p.returncode, p.stdout + p.stderr


# ------------------------------------------------------------------------------------------------ extraction
def part_extract(quick: bool = False, ceiling: float | None = None) -> dict:
    """``morphcache extract`` end to end on CUDA (bf16 auto), views/s and the ratio to the teacher ceiling."""
    _cuda()
    from morphcache.extract.engine import cpu_count
    from morphcache.extract.renderers import dali_available

    n = 512 if quick else 1536
    data = jpeg_folder(n)
    renderer = "dali" if dali_available() else "pil"
    workers = max(1, cpu_count() - 2)
    store = data.parent / f"store_{renderer}"
    t0 = time.perf_counter()
    rc, text = _morphcache(["extract", "--data", str(data), "--out", str(store), "--teacher", f"timm:{TEACHER}",
                            "--views", "2", "--batch-size", "256", "--workers", str(workers), "--renderer", renderer,
                            "--limit", str(n)], timeout=600)
    wall = time.perf_counter() - t0
    out = {"images": n, "views": 2 * n, "renderer": renderer, "render_threads": workers, "rc": rc,
           "dali_installed": dali_available(), "command_seconds": round(wall, 1), "output": text.strip()[-600:]}
    m = re.search(r"\(([\d.]+) views/s, pipeline ([\d.]+) views/s\)", text)
    if m:
        out["views_per_s"], out["pipeline_views_per_s"] = float(m.group(1)), float(m.group(2))
        if ceiling:
            out["teacher_ceiling_images_per_s"] = ceiling
            out["fraction_of_ceiling"] = round(out["pipeline_views_per_s"] / ceiling, 3)
    if renderer == "pil":
        out["note"] = "DALI is not installed: the PIL renderer on CPU threads fed the teacher (no GPU decode)"
    out["store"] = str(store)
    return out


# ------------------------------------------------------------------------------------------------ replay
def part_replay(quick: bool = False, store: str | None = None) -> dict:
    """Replay fidelity on CUDA: the CUDA-extracted store, and a CPU-extracted store replayed on CUDA."""
    _cuda()
    from morphcache.extract.renderers import dali_available
    from morphcache.extract.replay import replay_check

    out = {"rows": 32 if quick else 64, "runs": []}
    renderers = ["pil"] + (["dali", "dali-cpu"] if dali_available() else [])
    if store and Path(store).exists():
        for r in renderers:
            rep = replay_check(store, rows=out["rows"], renderer=r, batch_size=32, device="cuda")
            out["runs"].append({"extracted": f"cuda bf16, {Path(store).name.split('_')[-1]}", "replayed": f"cuda {rep.precision}, {r}",
                                "mean": rep.mean, "p1": rep.p1, "min": rep.min, "passed": rep.passed})
    # extracted on the CPU (fp32) with each renderer, replayed on CUDA
    data = jpeg_folder(512 if quick else 1536)
    for r_ex in (["pil"] + (["dali-cpu"] if dali_available() else [])):
        cpu_store = data.parent / f"cpu_store_{r_ex}"
        rc, text = _morphcache(["extract", "--data", str(data), "--out", str(cpu_store), "--teacher", f"timm:{TEACHER}",
                                "--views", "1", "--batch-size", "16", "--device", "cpu", "--limit", "32",
                                "--renderer", r_ex, "--workers", "4"], timeout=300)
        if rc != 0:
            out["runs"].append({"extracted": f"cpu fp32, {r_ex}", "error": text.strip()[-400:]})
            continue
        for r in renderers:
            for precision in ("fp32", "bf16"):
                rep = replay_check(cpu_store, rows=32, renderer=r, batch_size=16, device="cuda", precision=precision)
                out["runs"].append({"extracted": f"cpu fp32, {r_ex}", "replayed": f"cuda {precision}, {r}",
                                    "mean": rep.mean, "p1": rep.p1, "min": rep.min, "passed": rep.passed})
    return out


# ------------------------------------------------------------------------------------------------ rendering
def part_render(quick: bool = False) -> dict:
    """Views/s of the renderer alone (decode, crop, resize, jitter) per CPU thread count, at 224 px."""
    _cuda()
    from morphcache.extract.images import load_canonical_bytes
    from morphcache.extract.renderers import build_renderer, dali_available
    from morphcache.extract.engine import cpu_count
    from morphcache.extract.views import ViewSampler
    from morphcache.schemas import AugmentSpec

    data = jpeg_folder(512 if quick else 1536) / "class0"
    files = sorted(data.iterdir())[:256]
    encoded, rows = [], []
    sampler = ViewSampler(AugmentSpec(), 0)
    for i, f in enumerate(files):
        enc, (h, w) = load_canonical_bytes(f)
        encoded.append(enc)
        rows.append(sampler.row(i, 0, h, w))
    rows = np.stack(rows).astype(np.float32)
    threads = sorted({1, 4, max(1, cpu_count() // 2), cpu_count()})
    out = {"views": len(files), "batch": 64, "size": 224, "results": []}
    kinds = (["dali", "dali-cpu"] if dali_available() else []) + ["pil"]
    for kind in kinds:
        for t in threads:
            r = build_renderer(kind, 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "linear", 64, t, "cuda")
            r.render(encoded[:64], rows[:64])  # warm-up (pipeline build)
            reps = 1 if kind == "pil" else 2
            t0 = time.perf_counter()
            for _ in range(reps):
                for s in range(0, len(files), 64):
                    img = r.render(encoded[s:s + 64], rows[s:s + 64])[0]
            if img.is_cuda:
                import torch

                torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            out["results"].append({"renderer": kind, "threads": t, "views_per_s": round(reps * len(files) / sec, 1)})
    if not dali_available():
        out["note"] = "DALI is not installed: only the PIL fallback was measured"
    return out


# ------------------------------------------------------------------------------------------------ training
def _student_step(student_name: str, batch: int, size: int = 224):
    """(step(images, targets), objective) of the DTM student: forward, backward, clip, AdamW in bf16."""
    import torch

    from morphcache.schemas import RunConfig
    from morphcache.train.masking import build_block_mask_generator
    from morphcache.train.objectives import build_objective
    from morphcache.train.student import create_student

    config = RunConfig(store="-", model=student_name, objective="dtm", batch_size=batch)
    torch.manual_seed(0)
    student = create_student(student_name, size, 768, config.layer_scale, config.drop_path)
    objective = build_objective("dtm", config, student, 768, student.grid).cuda()
    optimizer = torch.optim.AdamW(objective.param_groups(config.weight_decay), lr=1e-4, fused=True)
    masker = build_block_mask_generator(config, student.grid)
    masks = [masker.batch(batch, np.random.default_rng((0, i))) for i in range(8)]
    counter = [0]

    def step(images, targets):
        counter[0] += 1
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = objective({"images": images, "targets": targets, "mask": masks[counter[0] % 8]})
        loss.backward()
        torch.nn.utils.clip_grad_norm_(objective.trainable_parameters(), 3.0)
        optimizer.step()
        return loss

    return step, objective


def part_train_step(quick: bool = False) -> dict:
    """Student step from cached targets vs with the live ViT-B/16 teacher (bf16, 224 px, batch 128)."""
    torch = _cuda()
    batch, iters = 128, (4 if quick else 12)
    teacher = _teacher("bf16")
    g = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, device="cuda", generator=g)
    targets = torch.randn(batch, 196, 768, device="cuda", generator=g)
    out = {"teacher": TEACHER, "batch": batch, "precision": "bf16", "objective": "dtm", "students": {}}
    goals = {"vit_small_patch16_224": 2.0, "vit_base_patch16_224": 1.25}
    bounds = {"vit_small_patch16_224": 2.3, "vit_base_patch16_224": 1.33}
    for name, goal in goals.items():
        step, objective = _student_step(name, batch)
        cached = _time_cuda(lambda: step(images, targets), warmup=3, iters=iters)
        live = _time_cuda(lambda: step(images, teacher.forward_tokens(images)[0]), warmup=2, iters=iters)
        ratio = live / cached
        out["students"][name] = {"cached_step_ms": round(cached * 1e3, 2), "live_step_ms": round(live * 1e3, 2),
                                 "cached_images_per_s": round(batch / cached, 1), "live_images_per_s": round(batch / live, 1),
                                 "speedup": round(ratio, 3), "goal": goal, "flop_bound": bounds[name],
                                 "meets_goal": ratio >= goal}
        del objective  # free this student before the next one (step is rebound next)
        torch.cuda.empty_cache()
    return out


def part_train_store(quick: bool = False) -> dict:
    """ViT-S/16 student step with targets from a real int8 store vs in-memory device targets; store read rate."""
    torch = _cuda()
    from morphcache.train.sampler import EpochSampler
    from morphcache.train.targets import TargetPrefetcher
    from morphcache.testing.stores import make_store

    batch, iters = 128, (6 if quick else 20)
    base = Path(os.environ.get("MORPHCACHE_BENCH_TMP") or tempfile.mkdtemp(prefix="mc_gpu_"))
    n_images = batch * 16  # steps beyond one epoch read the next epoch's order
    store = make_store(base / "train_store", n_images=n_images, views=1, chunk_images=256, T=196, D=768, seed=0)
    sampler = EpochSampler(store.ok_rows(), 1, batch, seed=0)
    g = torch.Generator(device="cuda").manual_seed(0)
    images = torch.randn(batch, 3, 224, 224, device="cuda", generator=g)
    memory = torch.randn(batch, 196, 768, device="cuda", generator=g)
    step, _ = _student_step("vit_small_patch16_224", batch)
    in_memory = _time_cuda(lambda: step(images, memory), warmup=3, iters=iters)

    pf = TargetPrefetcher(store, sampler, depth=3, device="cuda")
    counter = [0]

    def from_store():
        g = counter[0]
        counter[0] += 1
        return step(images, pf.get(g, sampler.batch_rows(g)))

    try:
        from_store_s = _time_cuda(from_store, warmup=3, iters=iters)
    finally:
        pf.close()
    row_bytes = 196 * 768 + 196 * 2  # int8 tokens + float16 scales
    # the store's read rate alone: raw reads into one reused buffer, over every batch of an epoch
    stage = (np.empty((batch, 196, 768), np.int8), np.empty((batch, 196), np.float16))
    t0 = time.perf_counter()
    n_read = 0
    for s in range(sampler.steps_per_epoch):
        store.read_raw(sampler.batch_rows(s), out=stage)
        n_read += batch
    read_s = time.perf_counter() - t0
    need = batch / in_memory * row_bytes
    return {"student": "vit_small_patch16_224", "batch": batch, "store_dtype": "int8", "rows": n_images,
            "in_memory_step_ms": round(in_memory * 1e3, 2), "from_store_step_ms": round(from_store_s * 1e3, 2),
            "store_vs_memory": round(in_memory / from_store_s, 3), "goal": 0.9,
            "meets_goal": in_memory / from_store_s >= 0.9,
            "store_read_bytes_per_s": round(n_read * row_bytes / read_s), "needed_bytes_per_s": round(need),
            "read_headroom": round(n_read * row_bytes / read_s / need, 2),
            "note": "page-cache-warm reads of a freshly written store (a cold disk is slower)"}


# ------------------------------------------------------------------------------------------------ driver
def run_part(name: str, quick: bool = False, context: dict | None = None) -> dict:
    """Run one part; ``context`` carries results earlier parts hand on (teacher ceiling, extract store)."""
    context = context or {}
    t0 = time.perf_counter()
    if name == "extract":
        res = part_extract(quick, ceiling=context.get("teacher_images_per_s"))
    elif name == "replay":
        res = part_replay(quick, store=context.get("extract_store"))
    else:
        res = globals()[f"part_{name}"](quick)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (default: print)")
    ap.add_argument("--quick", action="store_true", help="fewer images and iterations")
    ap.add_argument("--context", type=str, default=None, help="JSON of values earlier parts produced")
    args = ap.parse_args(argv)
    names = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown:
        print(f"bench_gpu: unknown part(s) {unknown}; use {', '.join(PARTS)}", file=sys.stderr)
        return 2
    context = json.loads(args.context) if args.context else {}
    results = {"environment": environment(), "parts": {}}
    for name in names:
        res = run_part(name, args.quick, context)
        results["parts"][name] = res
        if name == "teacher":
            context["teacher_images_per_s"] = res["images_per_s"]
        if name == "extract" and res.get("rc") == 0:
            context["extract_store"] = res["store"]
    text = json.dumps(results, indent=1)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
