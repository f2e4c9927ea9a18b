"""Per-worker extraction state on a dask cluster, as a ``distributed.WorkerPlugin``.

A dask worker process keeps its loaded teacher and renderer (one :class:`~morphcache.extract.engine.ChunkExtractor`
per teacher/batch/renderer setting) and the store's image table across the chunk tasks it runs. The driver
registers :class:`ExtractionWorkerState` on every worker when a job starts and unregisters it when the job ends,
which calls :meth:`ExtractionWorkerState.teardown` there: a long-lived remote worker does not keep our teacher in
its memory, and a worker holding DALI's threads exits promptly. No state lives in module globals.
"""

from __future__ import annotations

import gc
import threading

from distributed import WorkerPlugin

PLUGIN_NAME = "morphcache-extraction"


class ExtractionWorkerState(WorkerPlugin):
    """Cached extractors and image tables of one worker process (created empty on each worker by :meth:`setup`)."""

    name = PLUGIN_NAME

    def __init__(self) -> None:
        self.setup(None)

    def setup(self, worker) -> None:
        self.extractors: dict = {}
        self.tables: dict = {}
        self.lock = threading.Lock()  # one chunk at a time per process: teacher and renderer are not shared

    def teardown(self, worker) -> None:
        self.release()

    def __getstate__(self) -> dict:  # sent to the workers empty: a lock and a teacher do not travel
        return {}

    def __setstate__(self, state: dict) -> None:
        self.setup(None)

    def extractor(self, teacher_args: dict, batch_size: int, workers: int, renderer: str):
        """The cached ChunkExtractor for these settings (the teacher is loaded on first use). Call under ``lock``."""
        from morphcache.extract.engine import ChunkExtractor, load_teacher_by_name

        key = (tuple(sorted(teacher_args.items())), int(batch_size), int(workers), renderer)
        ex = self.extractors.get(key)
        if ex is None:
            teacher = load_teacher_by_name(**teacher_args)
            ex = self.extractors[key] = ChunkExtractor(teacher, batch_size, workers, renderer)
        return ex

    def image_table(self, store):
        """The store's ImageTable, read once per (store, manifest). Call under ``lock``."""
        key = (str(store.path.resolve()), store.spec.dataset_fingerprint)
        if key not in self.tables:
            self.tables.clear()
            self.tables[key] = store.image_table()
        return self.tables[key]

    def release(self) -> int:
        """Drop the cached teachers, renderers and tables; returns how many extractors were dropped."""
        with self.lock:
            n = len(self.extractors)
            self.extractors.clear()
            self.tables.clear()
        gc.collect()
        return n


def current_state() -> ExtractionWorkerState:
    """This dask worker's registered state, or a fresh one for a task called outside a worker (nothing is kept)."""
    from distributed import get_worker

    try:
        plugin = get_worker().plugins.get(PLUGIN_NAME)
    except ValueError:  # not running on a dask worker
        plugin = None
    return plugin if plugin is not None else ExtractionWorkerState()
