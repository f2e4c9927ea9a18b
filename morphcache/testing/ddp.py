"""Launch ``morphcache`` under torchrun from a test, and see which store rows each rank really trained on.

Two uses:

- :func:`launch` runs ``python -m torch.distributed.run --standalone --nproc_per_node N -m MODULE ARGS`` (or plain
  ``python -m MODULE`` for ``nproc=0``) in its own session with ``OMP_NUM_THREADS=1``, kills the whole process
  group on timeout, and returns the ``CompletedProcess``.
- ``python -m morphcache.testing.ddp ROWS_DIR train ...`` is ``python -m morphcache train ...`` with one addition: the
  training loader returned by ``morphcache.train.torch_loader.build_loader`` (both the DALI and the torch loader go
  through it) is wrapped so that every micro-batch the training loop takes appends its store rows as one JSON list
  line to ``ROWS_DIR/rank{RANK}.jsonl``. Line ``i`` is the ``i``-th micro-batch consumed by that rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout holding this copy of morphcache
#: torchrun variables that must not leak from the calling environment into a launch.
_DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def launch(args: list[str], nproc: int, cwd: Path, timeout: float = 180, module: str = "morphcache",
           ) -> subprocess.CompletedProcess:
    """Run ``module`` with ``args`` on ``nproc`` torchrun processes (0: plain ``python -m``, no torchrun)."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m"]
    if nproc:
        cmd += ["torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "-m"]
    cmd += [module, *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun, its workers and their loader processes: our session
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} did not finish in {timeout}s\nstdout:\n{out}\nstderr:\n{err}") from None
    except BaseException:  # interrupted test: leave no training processes behind
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def read_rows(rows_dir: Path, rank: int) -> list[list[int]]:
    """The micro-batches (lists of store rows) rank ``rank`` consumed, in order."""
    path = Path(rows_dir) / f"rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _install_row_recorder(rows_dir: Path) -> None:
    from morphcache.train import torch_loader

    original = torch_loader.build_loader
    path = rows_dir / f"rank{int(os.environ.get('RANK', '0'))}.jsonl"

    class _Recording:
        def __init__(self, inner) -> None:
            self.inner = inner

        def __iter__(self):
            for batch in self.inner:
                with path.open("a") as f:
                    f.write(json.dumps(batch.rows.tolist()) + "\n")
                yield batch

        def close(self) -> None:
            self.inner.close()

    def build_loader(*args, **kwargs):
        return _Recording(original(*args, **kwargs))

    torch_loader.build_loader = build_loader  # run_training imports it at call time


if __name__ == "__main__":
    rows_dir = Path(sys.argv[1])
    rows_dir.mkdir(parents=True, exist_ok=True)
    _install_row_recorder(rows_dir)
    from morphcache.cli import main

    sys.exit(main(sys.argv[2:]))
