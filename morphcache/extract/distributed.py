"""Scale-out of extraction: static shards (``--shard I/N``) and dask.distributed (``--dask ADDRESS|local``).

Both split the store's work chunks, the unit a writer owns (one zarr shard, one status chunk, one progress and
checksum file each), so processes on different chunks never write the same file.

- ``--shard I/N``: this process does the missing chunks ``c`` with ``c % N == I``; start N processes with any
  launcher (SLURM array, a shell loop). The store is created under a lock, so shards may start together.
- ``--dask``: the driver creates the store once, then submits one task per missing chunk. A task opens the store,
  re-checks ``progress[c]`` (skips done chunks, so a re-run or a retried task is harmless) and runs the same
  engine as a local run (:mod:`morphcache.extract.engine`). Teacher and renderer are built once per worker process
  and kept in a ``WorkerPlugin`` (:mod:`morphcache.extract.worker_state`) that the job registers and removes. ``local`` starts an embedded ``LocalCluster`` (``--dask-workers`` processes, one thread
  each; default one per core); anything else is a scheduler address.
- GPUs: with a CUDA teacher, ``local`` starts one worker per visible GPU, each pinned to its device through its
  own ``CUDA_VISIBLE_DEVICES`` (dask-cuda's ``LocalCUDACluster`` when it is installed, else a ``SpecCluster`` of
  nannies with per-worker environments; :func:`morphcache.device.assign_devices` decides the mapping), so every
  task runs its teacher on ``cuda`` = its own GPU. Under torchrun, ``--shard I/N`` runs on ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import re
import time

from morphcache.errors import ConfigError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N``."""
    m = _SHARD.match(text or "")
    if not m:
        raise ConfigError(f"--shard {text!r}: write it as I/N, e.g. 0/4 for the first of four shards")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need N >= 1 and 0 <= I < N")
    return i, n


def shard_chunks(chunks, index: int, count: int) -> list[int]:
    """The chunks of shard ``index`` of ``count`` (``c % count == index``), in order."""
    return [int(c) for c in chunks if int(c) % count == index]


def rows_in(store, chunks) -> int:
    """Rows (views) of ``chunks``, skipped images included."""
    return int(sum(b - a for a, b in (store.chunk_row_range(c) for c in chunks)))


def extract_chunk_task(store_path: str, chunk: int, teacher_args: dict, batch_size: int, workers: int,
                       on_bad_image: str, threads: int | None = None, renderer: str = "dali") -> dict:
    """One dask task: extract ``chunk`` of the store unless it is already done. Returns RunStats as a dict.

    ``threads`` sets torch's intra-op threads in the worker (default: the worker's own setting, one thread per
    dask worker thread under a nanny).
    """
    import torch

    from morphcache.store.feature_store import FeatureStore

    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    store = FeatureStore.open(store_path, mode="a")
    if int(store.progress()[chunk]) == 1:
        return {"chunks": [], "views": 0, "bad": []}
    from morphcache.extract.worker_state import current_state

    state = current_state()
    with state.lock:
        ex = state.extractor(teacher_args, batch_size, workers, renderer)
        stats = ex.run(store, [chunk], images=state.image_table(store), on_bad_image=on_bad_image)
    return {"chunks": stats.chunks, "views": stats.views, "bad": stats.bad}


def gpu_cluster(n_workers: int | None = None, devices=None):
    """An embedded cluster of one single-threaded worker process per GPU, each seeing only its own device.

    ``devices``: ``CUDA_VISIBLE_DEVICES`` entries to hand out (default: :func:`morphcache.device.visible_devices`);
    ``n_workers`` (default one per device) are assigned by :func:`morphcache.device.assign_devices`. Uses
    dask-cuda's ``LocalCUDACluster`` when importable and every worker gets its own device, else a
    ``SpecCluster`` of nannies whose ``env`` sets ``CUDA_VISIBLE_DEVICES`` before the worker process starts.
    """
    from morphcache.device import assign_devices, visible_devices

    devices = list(visible_devices() if devices is None else devices)
    assigned = assign_devices(n_workers, devices)
    if len(set(assigned)) == len(assigned):
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            LocalCUDACluster = None
        if LocalCUDACluster is not None:
            return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(assigned), threads_per_worker=1,
                                    dashboard_address=None)
    from dask.distributed import Nanny, Scheduler, SpecCluster

    workers = {f"gpu-{i}-dev{dev}": {"cls": Nanny, "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": dev}}}
               for i, dev in enumerate(assigned)}
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": None}}
    return SpecCluster(workers=workers, scheduler=scheduler)


def _client(address: str | None, n_workers: int | None, gpu: bool = False):
    """(client, cluster or None): an embedded LocalCluster for ``None``/``"local"`` (one worker per GPU when
    ``gpu``), else a scheduler address."""
    from dask.distributed import Client, LocalCluster

    from morphcache.extract.engine import cpu_count

    if gpu and address in (None, "", "local"):
        cluster = gpu_cluster(n_workers)
        return Client(cluster), cluster
    if address in (None, "", "local"):
        cluster = LocalCluster(n_workers=n_workers or cpu_count(), threads_per_worker=1, processes=True,
                               dashboard_address=None)
        return Client(cluster), cluster
    try:
        return Client(address, timeout="30s"), None
    except (OSError, TimeoutError) as exc:
        raise ConfigError(f"--dask {address}: cannot reach the dask scheduler ({type(exc).__name__}); "
                          "check the address or use --dask local") from None


def run_dask(store, chunks, opts, on_submit=None):
    """Fan ``chunks`` of ``store`` out as one task per chunk; returns the merged RunStats.

    ``on_submit()``, when given, is called once the scheduler is reached, just before the first task is submitted
    (from then on workers may write into the store).

    Raises:
        ConfigError: the ``opts.dask`` scheduler cannot be reached.
        MorphcacheError: a task's user error (``BadImageError`` under ``--on-bad-image fail``, a ``StoreError``),
            which dask re-raises here with its class.
    """
    from dask.distributed import as_completed

    from morphcache.extract.engine import RunStats
    from morphcache.progress import progress_bar

    from morphcache.extract.worker_state import PLUGIN_NAME, ExtractionWorkerState

    stats = RunStats()
    if not chunks:
        return stats
    gpu = str(opts.device).startswith("cuda")
    client, cluster = _client(opts.dask, opts.dask_workers, gpu=gpu)
    client.register_plugin(ExtractionWorkerState())
    teacher_args = opts.teacher_args()
    if gpu and cluster is not None:
        teacher_args["device"] = "cuda"  # each embedded worker sees only its own GPU, as cuda:0
    t0 = time.perf_counter()
    try:
        total = rows_in(store, chunks)
        if on_submit is not None:
            on_submit()
        futures = [
            client.submit(extract_chunk_task, str(store.path), int(c), teacher_args, opts.batch_size,
                          opts.workers, opts.on_bad_image, opts.threads, opts.renderer, key=f"morphcache-extract-{store.path.name}-{c}",
                          pure=False)
            for c in chunks
        ]
        with progress_bar(total=total, description="extract (dask)", unit="views") as bar:
            try:
                for fut in as_completed(futures):
                    res = fut.result()  # re-raises a task's error (e.g. BadImageError under --on-bad-image fail)
                    stats.merge(RunStats(chunks=list(res["chunks"]), views=int(res["views"]),
                                         bad=[tuple(b) for b in res["bad"]]))
                    bar.advance(rows_in(store, res["chunks"]))
                stats.pipeline_seconds = time.perf_counter() - t0  # includes the workers' teacher loading
            except BaseException:
                client.cancel(futures)
                raise
    finally:
        try:
            client.unregister_worker_plugin(PLUGIN_NAME)  # runs teardown (release) on every worker
        except Exception:  # noqa: BLE001 - best effort: a worker that died has nothing left to release
            pass
        client.close()
        if cluster is not None:
            cluster.close()
    return stats
