"""``store verify``: check every chunk of a store through plain zarr.

For each chunk ``c`` (rows ``chunk_row_range(c)``):

- it is done (``progress[c] == 1``; anything else is listed as not written);
- its data decode (a damaged shard, index or compressed block is listed with the decoder's complaint);
- the blake2b-64 of its stored tokens, scales, pooled and views equals ``checksums[c]``;
- no NaN or inf in float16 tokens, scales, pooled or views, and int8 scales are >= 0;
- none of its images is still pending (status 255).

The spec and the array shapes/dtypes are validated by :meth:`FeatureStore.open` first (a store that fails
there is a user error, not a bad chunk). Reads go through zarr, not the fast row reader, so verify also checks
what every other zarr client will see.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from morphcache.store.feature_store import FeatureStore, chunk_checksum
from morphcache.store.image_table import STATUS_PENDING


@dataclass
class VerifyReport:
    """Result of :func:`verify_store`: ``problems[c]`` lists what is wrong with chunk ``c``."""

    path: str
    n_chunks: int
    problems: dict[int, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        return [f"chunk {c}: {'; '.join(msgs)}" for c, msgs in sorted(self.problems.items())]


def check_chunk(store: FeatureStore, c: int, progress: int, stored_checksum: int) -> list[str]:
    """Problems of chunk ``c`` (empty when it is good)."""
    if progress != 1:
        return ["not written (progress 0); re-run extract to finish it" if progress == 0 else f"bad progress value {progress}"]
    a, b = store.chunk_row_range(c)
    ia, ib = store.chunk_image_range(c)
    try:
        tokens = np.asarray(store.array("tokens")[a:b])
        scales = np.asarray(store.array("scales")[a:b]) if store.spec.dtype == "int8" else None
        pooled = np.asarray(store.array("pooled")[a:b])
        views = np.asarray(store.array("views")[a:b])
        status = np.asarray(store.array("images/status")[ia:ib])
    except Exception as exc:  # zarr/numcodecs raise many types for damaged bytes
        return [f"unreadable data ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"]
    problems = []
    computed = chunk_checksum(tokens, scales, pooled, views)
    if computed != stored_checksum:
        problems.append(f"checksum mismatch (stored {stored_checksum:016x}, computed {computed:016x})")
    for name, arr in (("tokens", tokens), ("scales", scales), ("pooled", pooled), ("views", views)):
        if arr is not None and arr.dtype.kind == "f":
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            if bad:
                problems.append(f"{bad} NaN/inf values in {name}")
    if scales is not None and np.any(scales < 0):
        problems.append("negative int8 scales")
    if np.any(status == STATUS_PENDING):
        problems.append(f"{int(np.count_nonzero(status == STATUS_PENDING))} images still pending")
    return problems


def verify_store(store: FeatureStore, show_progress: bool = True) -> VerifyReport:
    """Check every chunk; returns a :class:`VerifyReport` listing every bad chunk. Damaged chunks are reported,
    not raised (the store was opened by the caller, which is where a missing or malformed store is refused:
    :meth:`~morphcache.store.feature_store.FeatureStore.open` raises ``StoreNotFoundError`` / ``StoreError``)."""
    from morphcache.progress import progress_bar

    report = VerifyReport(str(store.path), store.n_chunks)
    progress = store.progress()
    checksums = np.asarray(store.array("checksums")[:])
    rows = store.chunk_rows
    if not show_progress:
        for c in range(store.n_chunks):
            found = check_chunk(store, c, int(progress[c]), int(checksums[c]))
            if found:
                report.problems[c] = found
        return report
    with progress_bar(total=store.n_rows, description="verify", unit="views", log_every=5.0) as bar:
        for c in range(store.n_chunks):
            found = check_chunk(store, c, int(progress[c]), int(checksums[c]))
            if found:
                report.problems[c] = found
            bar.advance(min(rows, store.n_rows - c * rows))
    return report
