"""One GPU check in eight minutes: install missing packages from local wheels, run the cuda tests and the GPU
benchmarks, each under its own time limit, and write one JSON plus a log.

    python benchmarks/gpu_check.py --wheels .whl --out OUT [--budget 480] [--parts ...] [--quick]
    python benchmarks/gpu_check.py --dry-run --out OUT        # without CUDA: exercises its own logic, skips the rest

Steps (each a subprocess with a timeout, so a hang costs only its own limit; the remaining budget caps every limit):

1. ``install``: every ``*.whl`` in ``--wheels`` into a temporary site folder with ``pip install --no-index --no-deps
   --target`` (nothing is downloaded), put first on ``sys.path`` and on ``PYTHONPATH`` for the subprocesses;
2. ``imports``: the packages morphcache needs import (zarr, numcodecs, dask, distributed, pydantic, open_clip, typer,
   rich) and ``morphcache`` itself;
3. ``tests``: ``pytest -m cuda tests/test_cuda.py`` plus ``tests/test_device.py`` (DALI tests skip when DALI is absent);
4. the parts of ``benchmarks/bench_gpu.py``, non-DALI work first: teacher ceiling, training steps, extract, replay,
   store-fed training, render, and ``torch.compile`` of the teacher last.

Writes ``OUT/gpu_check.json`` (environment, each step's status, seconds and result, what was skipped and why) and
``OUT/gpu_check.log`` (every subprocess's output). Exit 0 when every step that ran passed, 1 otherwise.

Preparing the wheel folder (on a machine with network; see README "GPU"): ``pip download --no-deps
--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 ... -d .whl NAME==VER``
for each missing package. The nvidia-dali-cuda130 wheel is 199 MB (plus nvidia-nvimgcodec) and usually cannot travel;
without it the DALI parts are skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench_gpu.py"
DEFAULT_BUDGET = 480.0  # seconds: the whole check, installation included
#: (step, its own time limit in seconds), in the order they run.
PLAN = [("install", 90), ("imports", 60), ("tests", 240), ("teacher", 60), ("train_step", 90), ("extract", 100),
        ("replay", 80), ("train_store", 70), ("render", 50), ("teacher_compile", 100)]
BENCH_PARTS = [name for name, _ in PLAN if name not in ("install", "imports", "tests")]
RESERVE = 10.0  # seconds kept back for writing the report
IMPORTS = ["numpy", "torch", "timm", "PIL", "zarr", "numcodecs", "dask", "distributed", "pydantic", "open_clip", "catalogue", "yaml",
           "typer", "rich"]


class Log:
    """Appends to OUT/gpu_check.log and echoes short lines to stdout."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.write_text("")

    def write(self, text: str, echo: bool = True) -> None:
        with self.path.open("a") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        if echo:
            print(text, flush=True)


def run_limited(cmd: list[str], limit: float, env: dict | None = None, cwd: Path = ROOT) -> dict:
    """Run ``cmd`` with a wall-clock ``limit`` (its whole process group is killed at the limit).

    Returns ``{"rc", "seconds", "timed_out", "output"}``; rc is None when it timed out or could not start.
    """
    import signal

    t0 = time.perf_counter()
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             cwd=str(cwd), start_new_session=True)
    except OSError as exc:
        return {"rc": None, "seconds": 0.0, "timed_out": False, "output": f"could not start: {exc}"}
    try:
        out, _ = p.communicate(timeout=max(1.0, limit))
        return {"rc": p.returncode, "seconds": round(time.perf_counter() - t0, 1), "timed_out": False, "output": out}
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = p.communicate()
        return {"rc": None, "seconds": round(time.perf_counter() - t0, 1), "timed_out": True, "output": out or ""}


def wheel_names(folder: Path) -> dict[str, list[str]]:
    """Distribution name (normalized) -> wheel files in ``folder``; more than one file per name is an error for
    pip, so :func:`check_wheels` reports it."""
    names: dict[str, list[str]] = {}
    for f in sorted(folder.glob("*.whl")):
        dist = re.sub(r"[-_.]+", "-", f.name.split("-")[0]).lower()
        names.setdefault(dist, []).append(f.name)
    return names


def check_wheels(folder: Path | None) -> dict:
    """What the wheel folder holds: files, total MiB, duplicated distributions (refused)."""
    if folder is None:
        return {"folder": None, "wheels": [], "mib": 0.0, "duplicates": {}}
    if not folder.is_dir():
        return {"folder": str(folder), "error": f"{folder}: not a folder of .whl files"}
    names = wheel_names(folder)
    files = [w for ws in names.values() for w in ws]
    return {"folder": str(folder), "wheels": files,
            "mib": round(sum((folder / w).stat().st_size for w in files) / 2**20, 1),
            "duplicates": {k: v for k, v in names.items() if len(v) > 1}}


#: The device machine's interpreter and platform, for checking the wheel set from another machine (dry run).
TARGET_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
                   *[a for tag in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
                                   "manylinux1_x86_64", "manylinux_2_5_x86_64") for a in ("--platform", tag)]]


def install_command(folder: Path, site: Path, dry_run: bool = False) -> list[str]:
    """pip's command installing every wheel of ``folder`` into ``site`` (no index, no dependencies resolved);
    ``dry_run``: only check they would install on the device machine (Python 3.12, manylinux x86_64)."""
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--disable-pip-version-check", "--upgrade", "--target", str(site),
            *(["--dry-run", *TARGET_PLATFORM] if dry_run else []),
            *[str(w) for w in sorted(folder.glob("*.whl"))]]


def with_site(env: dict, site: Path | None) -> dict:
    """``env`` with the repo root and ``site`` first on PYTHONPATH."""
    parts = [str(ROOT)] + ([str(site)] if site else []) + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(env, PYTHONPATH=os.pathsep.join(parts), PYTHONUNBUFFERED="1")


def cuda_available(env: dict) -> tuple[bool, str]:
    """(whether torch sees a CUDA device, a one-line description), asked in a subprocess."""
    code = ("import torch; ok = torch.cuda.is_available(); "
            "print(ok, torch.__version__, torch.cuda.get_device_name(0) if ok else 'no CUDA device')")
    res = run_limited([sys.executable, "-c", code], 60, env)
    line = (res["output"] or "").strip().splitlines()[-1:] or [""]
    return line[0].startswith("True"), line[0]


def pytest_summary(output: str) -> dict:
    """Counts from pytest's last summary line (passed, failed, skipped, errors)."""
    counts = {}
    tail = output.strip().splitlines()[-1] if output.strip() else ""
    for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed)", tail):
        counts[word.rstrip("s") if word.startswith("error") else word] = int(n)
    counts["line"] = tail[-300:]
    return counts


class Budget:
    """The whole check's deadline; each step gets min(its own limit, what is left minus the reserve)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def limit(self, own: float) -> float:
        return min(float(own), self.left() - RESERVE)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, default=None, help="folder of .whl files to install (no network used)")
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.log")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for the whole check (default 480)")
    ap.add_argument("--parts", default=",".join(BENCH_PARTS), help="benchmark parts to run (comma-separated; '' none)")
    ap.add_argument("--skip-tests", action="store_true", help="do not run the cuda tests")
    ap.add_argument("--quick", action="store_true", help="smaller benchmark parts")
    ap.add_argument("--dry-run", action="store_true", help="exercise the check's own logic only (any machine)")
    args = ap.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.out / "gpu_check.log")
    budget = Budget(args.budget)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in BENCH_PARTS]
    if unknown:
        print(f"gpu_check: unknown part(s) {unknown}; use {', '.join(BENCH_PARTS)}", file=sys.stderr)
        return 2
    report: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_seconds": args.budget,
                    "dry_run": bool(args.dry_run), "steps": {}, "skipped": {}, "parts": {}}
    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    env = with_site(dict(os.environ), None)

    def record(step: str, res: dict, extra: dict | None = None) -> bool:
        ok = res["rc"] == 0 and not res["timed_out"]
        entry = {"ok": ok, "rc": res["rc"], "seconds": res["seconds"], "timed_out": res["timed_out"], **(extra or {})}
        if not ok:
            entry["tail"] = (res["output"] or "")[-1500:]
        report["steps"][step] = entry
        log.write(f"===== {step}: {'ok' if ok else 'FAILED'} in {res['seconds']}s"
                  f"{' (timed out)' if res['timed_out'] else ''}")
        log.write(res["output"] or "", echo=False)
        return ok

    def skip(step: str, why: str) -> None:
        report["skipped"][step] = why
        log.write(f"===== {step}: skipped ({why})")

    # 1. wheels
    wheels = check_wheels(args.wheels)
    report["wheels"] = {k: v for k, v in wheels.items() if k != "wheels"} | {"count": len(wheels.get("wheels", []))}
    site = None
    if args.wheels is None:
        skip("install", "no --wheels folder given")
    elif "error" in wheels or wheels["duplicates"]:
        why = wheels.get("error") or f"more than one wheel of {sorted(wheels['duplicates'])}; keep one version each"
        report["steps"]["install"] = {"ok": False, "error": why}
        log.write(f"===== install: FAILED ({why})")
    elif not wheels["wheels"]:
        skip("install", f"{args.wheels} holds no .whl files")
    else:
        site = tmp / "site"
        res = run_limited(install_command(args.wheels, site, args.dry_run), budget.limit(dict(PLAN)["install"]), env)
        extra = {"wheels": len(wheels["wheels"]), "mib": wheels["mib"], "site": str(site)}
        if args.dry_run:
            record("install_check", res, extra)
            skip("install", "dry run: pip checked the wheels install on Python 3.12 manylinux x86_64, installed nothing")
            site = None
        elif record("install", res, extra):
            sys.path.insert(0, str(site))
            env = with_site(dict(os.environ), site)
        else:
            site = None

    # 2. imports
    code = "; ".join(f"import {m}" for m in IMPORTS) + "; import morphcache.cli; print('imports ok')"
    imports_ok = record("imports", run_limited([sys.executable, "-c", code], budget.limit(60), env))
    has_cuda, gpu_line = cuda_available(env)
    report["cuda"] = gpu_line
    log.write(f"cuda: {gpu_line}")
    env["MORPHCACHE_BENCH_TMP"] = str(tmp / "bench")

    # 3. tests
    test_files = ["tests/test_cuda.py", "tests/test_device.py"]
    if args.skip_tests:
        skip("tests", "--skip-tests")
    elif not imports_ok:
        skip("tests", "the imports failed")
    elif args.dry_run or not has_cuda:
        res = run_limited([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           *test_files], budget.limit(120), env)
        record("tests_collect", res, pytest_summary(res["output"]))
        skip("tests", "dry run: collected only" if args.dry_run else "no CUDA device: the cuda tests would all skip")
    else:
        import importlib.util

        per_test = ["--timeout", "120"] if importlib.util.find_spec("pytest_timeout") else []  # one hang, one test
        res = run_limited([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *per_test,
                           *test_files], budget.limit(dict(PLAN)["tests"]), env)
        record("tests", res, pytest_summary(res["output"]))

    # 4. benchmark parts, each in its own process
    context: dict = {}
    for name in [n for n, _ in PLAN if n in parts]:
        limit = budget.limit(dict(PLAN)[name])
        if args.dry_run or not has_cuda:
            res = run_limited([sys.executable, "-c", f"print('dry run: would run bench_gpu part {name}')"], limit, env)
            record(f"bench_{name}", res, {"would_run": [sys.executable, str(BENCH.relative_to(ROOT)), "--parts", name],
                                          "limit_seconds": round(min(limit, dict(PLAN)[name]), 1)})
            skip(name, "dry run" if args.dry_run else "no CUDA device")
            continue
        if not imports_ok:
            skip(name, "the imports failed")
            continue
        if limit < 15:
            skip(name, f"budget spent ({budget.left():.0f}s left)")
            continue
        part_json = tmp / f"part_{name}.json"
        cmd = [sys.executable, str(BENCH), "--parts", name, "--json", str(part_json), "--context", json.dumps(context)]
        if args.quick:
            cmd.append("--quick")
        res = run_limited(cmd, limit, env)
        ok = record(f"bench_{name}", res, {"limit_seconds": round(limit, 1)})
        if ok and part_json.is_file():
            data = json.loads(part_json.read_text())
            report.setdefault("environment", data.get("environment"))
            result = data["parts"][name]
            report["parts"][name] = result
            if name == "teacher":
                context["teacher_images_per_s"] = result["images_per_s"]
            if name == "extract" and result.get("rc") == 0:
                context["extract_store"] = result["store"]

    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["ok"] = all(s.get("ok", False) for s in report["steps"].values())
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    log.write(f"gpu_check: {'ok' if report['ok'] else 'SOME STEPS FAILED'} in {report['seconds']}s; "
              f"skipped: {', '.join(f'{k} ({v})' for k, v in report['skipped'].items()) or 'nothing'}; "
              f"wrote {args.out / 'gpu_check.json'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
