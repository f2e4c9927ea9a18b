"""Device and precision resolution (morphcache.device), GPU-per-worker assignment, and the CLI's refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from morphcache import device as dev
from morphcache.errors import ConfigError


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch reports two CUDA devices; bf16 support is switchable through the returned dict."""
    state = {"bf16": True}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: state["bf16"])
    return state


def test_auto_is_cpu_fp32_without_cuda(no_cuda):
    assert dev.resolve_device("auto") == "cpu"
    assert dev.resolve_device(None) == "cpu"
    assert dev.resolve_precision("auto", "cpu") == "fp32"  # CPU results unchanged by the auto default
    assert dev.resolve_precision("bf16", "cpu") == "bf16"


def test_cuda_request_without_cuda_is_one_clear_line(no_cuda):
    for value in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError, match="sees no CUDA device") as info:
            dev.resolve_device(value)
        assert "\n" not in str(info.value)


def test_auto_picks_cuda_and_bf16_when_present(fake_cuda):
    assert dev.resolve_device("auto") == "cuda"
    assert dev.resolve_device("cuda:1") == "cuda:1"
    assert dev.resolve_precision("auto", "cuda") == "bf16"
    fake_cuda["bf16"] = False  # a pre-Ampere GPU: fp16 where allowed, else fp32
    assert dev.resolve_precision("auto", "cuda") == "fp16"
    assert dev.resolve_precision("auto", "cuda", allowed=("bf16", "fp32")) == "fp32"


def test_bad_values_refused(fake_cuda):
    with pytest.raises(ConfigError, match="only 2 CUDA device"):
        dev.resolve_device("cuda:5")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ConfigError, match="--device"):
            dev.resolve_device(bad)
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        dev.resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="use auto or one of bf16, fp32"):
        dev.resolve_precision("fp16", "cuda", allowed=("bf16", "fp32"))


@pytest.mark.parametrize("n_devices", [1, 2, 8])
def test_one_worker_per_device(n_devices):
    devices = [str(i) for i in range(n_devices)]
    assigned = dev.assign_devices(None, devices)
    assert assigned == devices  # default: one worker per GPU, each on its own
    assert len(set(assigned)) == n_devices


@pytest.mark.parametrize("n_devices,n_workers", [(1, 3), (2, 5), (8, 4), (8, 16)])
def test_more_or_fewer_workers_round_robin(n_devices, n_workers):
    devices = [f"GPU-{i}" for i in range(n_devices)]
    assigned = dev.assign_devices(n_workers, devices)
    assert assigned == [devices[i % n_devices] for i in range(n_workers)]
    counts = [assigned.count(d) for d in set(assigned)]
    assert max(counts) - min(counts) <= 1  # balanced


def test_assign_refuses_no_device_or_no_worker():
    with pytest.raises(ConfigError, match="no CUDA device"):
        dev.assign_devices(None, [])
    with pytest.raises(ConfigError, match="at least 1"):
        dev.assign_devices(0, ["0"])


def test_visible_devices_reads_the_environment():
    assert dev.visible_devices({"CUDA_VISIBLE_DEVICES": "3, 5,GPU-ab"}) == ["3", "5", "GPU-ab"]
    assert dev.visible_devices({"CUDA_VISIBLE_DEVICES": ""}) == []
    assert dev.visible_devices({}, count=8) == [str(i) for i in range(8)]


@pytest.mark.parametrize("n_devices", [1, 2, 8])
def test_local_rank_device(n_devices):
    got = [dev.local_rank_device({"LOCAL_RANK": str(r)}, count=n_devices) for r in range(8)]
    assert got == [f"cuda:{r % n_devices}" for r in range(8)]
    assert dev.local_rank_device({}, count=n_devices) == "cuda"
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        dev.local_rank_device({"LOCAL_RANK": "x"}, count=n_devices)


def test_describe_marks_auto():
    assert dev.describe("cpu", "fp32") == "device cpu (auto), precision fp32 (auto)"
    assert dev.describe("cpu", "bf16", "cpu", "bf16") == "device cpu, precision bf16"


@pytest.mark.parametrize("argv", [
    ["extract", "--data", "x", "--out", "y", "--device", "cuda"],
    ["train", "--store", "x", "--out", "y", "--device", "cuda"],
    ["eval", "knn", "-c", "random:vit_tiny_patch16_224", "-d", "digits", "--device", "cuda"],
    ["store", "replay-check", "x", "--device", "cuda:0"],
])
def test_cli_refuses_cuda_without_cuda(no_cuda, argv, capsys):
    from morphcache.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sees no CUDA device" in err[0]


def test_gpu_cluster_pins_each_worker(tmp_path):
    """The per-GPU dask cluster (no dask-cuda here) gives every worker process its own CUDA_VISIBLE_DEVICES."""
    pytest.importorskip("distributed")
    from dask.distributed import Client

    from morphcache.extract.distributed import gpu_cluster

    cluster = gpu_cluster(None, devices=["0", "1"])
    try:
        with Client(cluster) as client:
            seen = client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(seen.values()) == ["0", "1"]
    finally:
        cluster.close()


# ------------------------------------------------------------------------------------ benchmarks/gpu_check.py
def _gpu_check():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_wheel(folder, name="mcdummy", version="0.1"):
    """A minimal pure-Python wheel (pip installs it offline) whose module says where it was imported from."""
    import zipfile

    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{dist}/RECORD,,\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def test_gpu_check_stops_a_step_at_its_limit():
    import sys

    gc = _gpu_check()
    res = gc.run_limited([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"], 2)
    assert res["timed_out"] and res["rc"] is None and "started" in res["output"]
    ok = gc.run_limited([sys.executable, "-c", "print('hi')"], 30)
    assert ok["rc"] == 0 and not ok["timed_out"] and ok["output"].strip() == "hi"


def test_gpu_check_refuses_two_versions_of_one_wheel(tmp_path):
    gc = _gpu_check()
    _tiny_wheel(tmp_path / "w", version="0.1")
    _tiny_wheel(tmp_path / "w", version="0.2")
    gc.IMPORTS = ["numpy"]
    info = gc.check_wheels(tmp_path / "w")
    assert list(info["duplicates"]) == ["mcdummy"]
    assert gc.main(["--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "w"), "--skip-tests", "--parts", "",
                    "--dry-run"]) == 1
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert "keep one version" in report["steps"]["install"]["error"]


def test_gpu_check_installs_wheels_offline_and_skips_gpu_parts_without_cuda(tmp_path):
    """The wheels install into a temp site (importable by the subprocesses) and the imports are checked; without
    CUDA (as in CI) every benchmark part asked for is reported as skipped with the reason."""
    gc = _gpu_check()
    _tiny_wheel(tmp_path / "w")
    gc.IMPORTS = ["numpy", "mcdummy"]  # what this machine's subprocess must import through the installed site
    has_cuda = torch.cuda.is_available()
    rc = gc.main(["--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "w"), "--skip-tests",
                  "--parts", "" if has_cuda else "teacher,extract"])  # with a GPU this would run the benchmarks
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["steps"]["install"]["ok"] and report["steps"]["imports"]["ok"], report
    assert (Path(report["steps"]["install"]["site"]) / "mcdummy" / "__init__.py").is_file()
    if not has_cuda:
        assert set(report["skipped"]) >= {"tests", "teacher", "extract"}
        assert report["skipped"]["teacher"] == "no CUDA device"
        assert rc == 0 and report["ok"]
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("=====") >= 4


def test_gpu_check_dry_run_checks_wheels_for_the_device_platform(tmp_path):
    gc = _gpu_check()
    _tiny_wheel(tmp_path / "w")
    gc.IMPORTS = ["numpy"]
    assert gc.main(["--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(tmp_path / "w"), "--skip-tests",
                    "--parts", "teacher"]) == 0
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["dry_run"] and report["steps"]["install_check"]["ok"]
    assert report["skipped"]["install"].startswith("dry run") and report["skipped"]["teacher"] == "dry run"
    assert report["steps"]["bench_teacher"]["would_run"][-1] == "teacher"
    assert not (tmp_path / "out" / "site").exists()
