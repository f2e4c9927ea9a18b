"""The study's sizes and its list of runs (which settings, which seeds, in which order).

A *setting* is everything about a student run except its seed; a *run* is a setting plus a seed. Runs that two
questions share are one run (Q1's DTM student on all V views is also Q2's DTM arm and Q3's int8 arm).

- Q1 cache vs live teacher: DTM students trained from the first V of the store's views, V = 1, 2, 4, ... up to
  ``views`` (``RunConfig.views_used``), and with the live teacher (``teacher_online``) on a fresh view every
  epoch (``view_order="epoch"``: epoch e renders stored view e, which no earlier epoch used; this needs
  ``epochs <= views``). ``q1_seeds`` seeds each.
- Q2 DTM vs token-wise on all views, ``q2_seeds`` seeds each, paired.
- Q3 int8 vs float16 targets, DTM, ``q3_seeds`` seeds: a float16 store of ``q3_views`` views per image (the same
  views as the first ``q3_views`` of the int8 store: the same extraction seed) against the int8 store's first
  ``q3_views`` views (a Q1 run when ``q3_views`` is one of its V); the sampler draws the same views of the same
  images in the same order from both, so only the storage precision differs. A small ``q3_views`` keeps the
  second extraction cheap.
- Q4 DTM vs token-wise on targets made spatially inconsistent (:mod:`morphcache.study.noise`), ``q4_seeds``.

Order: seed by seed, Q1 and Q2 first, so that the most important comparisons have two seeds as early as possible
and an interrupted study still summarises (``morphcache study report``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from morphcache.errors import ConfigError


@dataclass(frozen=True)
class StudySizes:
    """Every size of the study (each one a ``study run`` flag). Defaults: about two hours on 2 idle CPU cores."""

    images: int = 2000  # pretraining images
    views: int = 8  # views per image in the store (serves V = 1, 2, 4, ..., views)
    epochs: int = 6  # student epochs (one view per image per epoch); <= views for the live teacher
    batch_size: int = 32
    q1_seeds: int = 2
    q2_seeds: int = 3
    q3_seeds: int = 2
    q4_seeds: int = 2
    q3_views: int = 2  # views per image of Q3's float16 store
    eval_train: int = 5000  # labelled train images whose features the k-NN / probe fit on (stratified subset)
    eval_test: int = 10000  # labelled test images (Fashion-MNIST's full test set)
    probe_epochs: int = 30
    noise_cosine: float = 0.5  # Q4: neighbour-token cosine of the noisy targets
    questions: tuple[str, ...] = ("q1", "q2", "q3", "q4")

    def check(self) -> None:
        """Raise ConfigError naming the flag of an impossible size."""
        for name in ("images", "views", "epochs", "batch_size", "eval_train", "eval_test", "probe_epochs",
                     "q3_views"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        for q in ("q1", "q2", "q3", "q4"):
            if getattr(self, f"{q}_seeds") < 0:
                raise ConfigError(f"--{q}-seeds must be >= 0")
        unknown = [q for q in self.questions if q not in ("q1", "q2", "q3", "q4")]
        if unknown or not self.questions:
            raise ConfigError(f"--questions {','.join(self.questions)}: use a comma list of q1,q2,q3,q4")
        if "q1" in self.questions and self.q1_seeds and self.epochs > self.views:
            raise ConfigError(f"--epochs {self.epochs} exceeds --views {self.views}: the live teacher renders stored "
                              "view e in epoch e, so it needs at least as many views as epochs")
        if self.q3_views > self.views:
            raise ConfigError(f"--q3-views {self.q3_views} exceeds --views {self.views}")
        if self.images < self.batch_size:
            raise ConfigError(f"--images {self.images} is smaller than --batch-size {self.batch_size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Setting:
    """A student run minus its seed."""

    objective: str = "dtm"  # dtm | tokenwise
    views_used: int = 8
    live: bool = False  # teacher_online on a fresh view every epoch
    dtype: str = "int8"  # the store the targets come from: int8 | float16
    noise: bool = False  # Q4's spatially inconsistent targets

    @property
    def key(self) -> str:
        parts = [self.objective, "live" if self.live else f"v{self.views_used}", self.dtype]
        if self.noise:
            parts.append("noise")
        return "-".join(parts)

    @property
    def label(self) -> str:
        obj = "DTM" if self.objective == "dtm" else "token-wise"
        src = "live teacher" if self.live else f"cache V={self.views_used}"
        extra = ", float16" if self.dtype == "float16" else ""
        extra += ", noisy targets" if self.noise else ""
        return f"{obj}, {src}{extra}"

    def to_dict(self) -> dict:
        return {**asdict(self), "key": self.key, "label": self.label}


@dataclass(frozen=True)
class Run:
    setting: Setting
    seed: int

    @property
    def run_id(self) -> str:
        return f"{self.setting.key}-s{self.seed}"


@dataclass(frozen=True)
class Comparison:
    """A paired comparison ``a - b`` reported under ``question``."""

    question: str
    name: str
    a: Setting
    b: Setting

    def to_dict(self) -> dict:
        return {"question": self.question, "name": self.name, "a": self.a.key, "b": self.b.key}


def view_counts(views: int) -> list[int]:
    """V = 1, 2, 4, ... below ``views``, then ``views`` itself."""
    out, v = [], 1
    while v < views:
        out.append(v)
        v *= 2
    return out + [views]


@dataclass
class StudyPlan:
    sizes: StudySizes
    runs: list[Run] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    questions: dict[str, list[str]] = field(default_factory=dict)  # question -> setting keys

    def settings(self) -> dict[str, Setting]:
        return {r.setting.key: r.setting for r in self.runs}


def build_plan(sizes: StudySizes) -> StudyPlan:
    """The ordered, de-duplicated run list and the comparisons of the questions in ``sizes.questions``.

    Raises:
        ConfigError: a size below 1, negative seeds, unknown questions, more epochs than views for q1, q3 views
            above the views, fewer images than a batch (:meth:`StudySizes.check`).
    """
    sizes.check()
    V = sizes.views
    dtm_all = Setting("dtm", V)
    tok_all = Setting("tokenwise", V)
    live = Setting("dtm", V, live=True)
    per_question: dict[str, tuple[int, list[Setting]]] = {}
    comparisons: list[Comparison] = []
    qs = sizes.questions
    if "q1" in qs:
        cached = [Setting("dtm", v) for v in view_counts(V)]
        per_question["q1"] = (sizes.q1_seeds, cached + [live])
        comparisons += [Comparison("q1", f"cache V={s.views_used} - live", s, live) for s in cached]
    if "q2" in qs:
        per_question["q2"] = (sizes.q2_seeds, [dtm_all, tok_all])
        comparisons.append(Comparison("q2", "DTM - token-wise", dtm_all, tok_all))
    if "q3" in qs:
        i8, f16 = Setting("dtm", sizes.q3_views), Setting("dtm", sizes.q3_views, dtype="float16")
        per_question["q3"] = (sizes.q3_seeds, [i8, f16])
        comparisons.append(Comparison("q3", f"float16 - int8 (V={sizes.q3_views})", f16, i8))
    if "q4" in qs:
        nd, nt = Setting("dtm", V, noise=True), Setting("tokenwise", V, noise=True)
        per_question["q4"] = (sizes.q4_seeds, [nd, nt])
        comparisons.append(Comparison("q4", "DTM - token-wise (noisy targets)", nd, nt))
    runs: list[Run] = []
    seen: set[str] = set()
    # Q1 and Q2 seed by seed first, then Q3 and Q4 seed by seed.
    for group in (("q1", "q2"), ("q3", "q4")):
        max_seed = max([per_question[q][0] for q in group if q in per_question] or [0])
        for seed in range(max_seed):
            for q in group:
                if q not in per_question or seed >= per_question[q][0]:
                    continue
                for s in per_question[q][1]:
                    run = Run(s, seed)
                    if run.run_id not in seen:
                        seen.add(run.run_id)
                        runs.append(run)
    questions = {q: [s.key for s in settings] for q, (_, settings) in per_question.items()}
    return StudyPlan(sizes, runs, comparisons, questions)
