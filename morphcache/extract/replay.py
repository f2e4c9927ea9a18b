"""Replay fidelity: re-render stored views the way training does, re-run the teacher, compare with the cache.

``morphcache store replay-check STORE --rows K`` samples K servable rows (seeded, spread over the whole store),
reads each row's ViewParams and its source image (through the same
:func:`~morphcache.extract.images.load_canonical_bytes` path and content-hash check as extraction), renders the
views with the training renderer (:class:`~morphcache.extract.render_dali.DaliRenderer`, i.e.
``build_view_pipeline``) or the PIL fallback, runs the teacher rebuilt from the store's
:class:`~morphcache.schemas.TeacherSpec`, and reports the per-token cosine between the fresh tokens and the
cached (dequantized) ones: mean, minimum and 1st percentile. The goal is 0.999 for float16 stores and 0.998 for
int8 stores (quantization alone costs about 1e-4).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from morphcache.errors import ConfigError, StoreError

#: Minimum acceptable mean and 1st-percentile per-token cosine, by store dtype.
GOALS = {"float16": 0.999, "int8": 0.998}


@dataclass
class ReplayReport:
    """Per-token cosine statistics of a replay check over ``rows`` views (``rows * T`` tokens)."""

    store: str
    renderer: str
    dtype: str
    rows: int
    tokens: int
    mean: float
    min: float
    p1: float
    goal: float
    device: str = "cpu"
    precision: str = "fp32"

    @property
    def passed(self) -> bool:
        return self.mean >= self.goal and self.p1 >= self.goal

    def line(self) -> str:
        verdict = "ok" if self.passed else "BELOW GOAL"
        return (f"replay-check {self.store}: {self.rows} views ({self.tokens} tokens), renderer {self.renderer}, "
                f"{self.dtype}, teacher on {self.device} in {self.precision}: per-token cosine mean {self.mean:.6f} min {self.min:.6f} p1 {self.p1:.6f} "
                f"(goal >= {self.goal}): {verdict}")

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed})


def sample_rows(store, k: int, seed: int = 0) -> np.ndarray:
    """Up to ``k`` servable row ids (int64, sorted), drawn without replacement with ``seed``."""
    ok = store.ok_rows()
    if len(ok) == 0:
        raise StoreError(f"{store.path}: no servable rows (no complete chunk with ok images); run extract first")
    if k < 1:
        raise ConfigError(f"--rows {k}: must be at least 1")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(ok, size=min(int(k), len(ok)), replace=False)).astype(np.int64)


def load_view_inputs(store, rows: np.ndarray, images=None) -> tuple[list[bytes], np.ndarray]:
    """Canonical encoded bytes of each row's image (one entry per row) and the stored view rows (n, P)."""
    from morphcache.extract.views import ViewSampler
    from morphcache.extract.workers import ChunkSource

    spec = store.spec
    images = store.image_table() if images is None else images
    source = ChunkSource(spec.dataset_root, images, ViewSampler(spec.augment, spec.seed), spec.views_per_image,
                         spec.chunk_images)
    cache: dict[int, bytes] = {}
    encoded = []
    for r in rows.tolist():
        i = r // spec.views_per_image
        if i not in cache:
            cache[i] = source.load_one(i)[0]
        encoded.append(cache[i])
    return encoded, store.read_views(rows)


def render_views(encoded: list[bytes], params: np.ndarray, size: int, mean, std, interpolation: str,
                 renderer: str = "dali", batch_size: int = 16, num_threads: int = 1, device: str = "cpu"):
    """Yield ``(start, images float32 (b, 3, S, S))`` for consecutive batches of the views, rendered by
    ``renderer`` (:data:`morphcache.extract.renderers.RENDERERS`; ``dali`` decodes on the GPU when ``device`` is
    CUDA)."""
    from morphcache.extract.renderers import build_renderer

    r = build_renderer(renderer, size, mean, std, interpolation, batch_size, num_threads, device)
    for s in range(0, len(encoded), batch_size):
        yield s, r.render(encoded[s:s + batch_size], params[s:s + batch_size])[0]


def replay_check(store_path, rows: int = 64, renderer: str = "dali", seed: int = 0, batch_size: int = 16,
                 device: str = "cpu", precision: str | None = None, weights: str | None = None) -> ReplayReport:
    """Re-render ``rows`` stored views, re-run the store's teacher and compare tokens with the cache."""
    from morphcache.extract.engine import load_store_teacher
    from morphcache.store.feature_store import FeatureStore
    from morphcache.store.quantize import token_cosine

    store = FeatureStore.open(store_path, mode="r")
    spec = store.spec
    ids = sample_rows(store, rows, seed)
    encoded, params = load_view_inputs(store, ids)
    teacher = load_store_teacher(spec.teacher, device=device, precision=precision, weights=weights)
    cached = store.read_tokens_numpy(ids)  # (n, T, D) float32
    cos = np.empty((len(ids), spec.n_tokens), dtype=np.float64)
    t = spec.teacher
    for s, images in render_views(encoded, params, t.image_size, t.mean, t.std, spec.augment.interpolation,
                                  renderer, batch_size, device=str(teacher.device)):
        tokens, _ = teacher.forward_tokens(images)  # (b, T, D)
        cos[s:s + len(images)] = token_cosine(tokens.cpu().numpy(), cached[s:s + len(images)])
    flat = cos.reshape(-1)
    return ReplayReport(store=str(store.path), renderer=renderer, dtype=spec.dtype, rows=len(ids),
                        tokens=int(flat.size), mean=float(flat.mean()), min=float(flat.min()),
                        p1=float(np.percentile(flat, 1)), goal=GOALS[spec.dtype], device=str(teacher.device),
                        precision=teacher.precision)
