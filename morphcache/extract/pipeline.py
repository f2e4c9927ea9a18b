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
from morphcache.extract.engine import ChunkExtractor, RunStats, load_teacher_by_name, cpu_count
from morphcache.extract.options import ExtractOptions
from morphcache.extract.store_setup import plan_store, run_store


def configure_threads(device: str, threads: int | None = None) -> None:
    """Teacher intra-op threads: ``threads`` or every core on CPU; rendering uses DALI's own ``--workers`` threads."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    elif device == "cpu":
        torch.set_num_threads(cpu_count())


def resolve_options(opts: ExtractOptions) -> ExtractOptions:
    """``opts`` with ``auto`` device and precision resolved (:mod:`morphcache.device`) and the cross-option rules
    checked (field values are validated by :class:`ExtractOptions` itself). Under torchrun, a CUDA ``--shard`` run
    takes the GPU of its ``LOCAL_RANK``.

    Raises:
        ConfigError: CUDA asked for where there is none, an impossible precision, ``--shard`` with ``--dask``.
    """
    from morphcache.device import local_rank_device, resolve_device, resolve_precision

    if opts.shard is not None and (opts.dask is not None or opts.dask_workers is not None):
        raise ConfigError("--shard and --dask cannot be combined; use one way to split the work")
    device = resolve_device(opts.device)
    if device == "cuda" and opts.shard is not None and "LOCAL_RANK" in os.environ:
        device = local_rank_device()  # torchrun: one GPU per process
    return opts.replace(device=device, precision=resolve_precision(opts.precision, device))


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
    """Extract (or resume) a store as ``opts`` says: locally, one shard of it, or over dask.

    Raises:
        ConfigError: invalid option combinations or devices (:func:`resolve_options`), an unknown or unloadable
            teacher, weights whose hash differs, an unreachable ``--dask`` scheduler.
        MorphcacheError: an unusable ``--data`` (no such folder / list, no images, a malformed list file).
        SpecMismatchError: ``opts.out`` holds a store of another spec.
        StoreError: ``opts.out`` is a non-empty folder that is not a store, or a damaged store.
        BadImageError: a bad image under ``on_bad_image="fail"``.
    """
    import torch

    from morphcache.progress import progress_bar

    opts = resolve_options(opts)
    t0 = time.perf_counter()
    previous_threads = torch.get_num_threads()
    configure_threads(opts.device, opts.threads)
    try:
        teacher = load_teacher_by_name(**opts.teacher_args())
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

