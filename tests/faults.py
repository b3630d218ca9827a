"""SIGKILL fault injection for the real command line (issue 21 item 3).

`kill_and_resume` runs `patchscope ...` as a subprocess, kills it with SIGKILL at seeded random delays chosen
relative to a measured clean run's wall time (so kills land during work, not only during import), re-runs
it with its resume arguments after each kill, then to completion; `check_files` parses every file in an
output folder by type and `tree_bytes` gives the bytes to compare with an uninterrupted run.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

CLI = [str(Path(sys.executable).with_name("patchscope"))]
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}


def run_clean(args: list[str], timeout: float = 300) -> float:
    """Run to completion; return the wall time. Fails with the command's output if it fails."""
    start = time.monotonic()
    done = subprocess.run(CLI + args, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{args}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return time.monotonic() - start


@dataclass
class FaultReport:
    kills: int = 0
    killed_alive: int = 0  # kills that found the process still running
    delays: list[float] = field(default_factory=list)
    resumed_ok: bool = False


def kill_and_resume(first: list[str], resume: Callable[[], list[str]], kills: int, seed: int, clean_s: float,
                    timeout: float = 300, skips_done_s: float | None = None) -> FaultReport:
    """Start `first`, SIGKILL it after a seeded uniform delay in [0.3 s, clean_s]; each later start uses
    resume() (called then, so it can look at what the killed run left). After `kills` kills, run resume()
    to completion; it must exit 0.

    `skips_done_s`, for a command whose restart skips the work already finished (`demo`), is the wall time
    of a restart with nothing left to do; the range of the next delay then shrinks to the work left,
    [0.3 s, upper - delay + skips_done_s], so the later kills still land while it works."""
    rng = random.Random(seed)
    report = FaultReport()
    args = first
    upper = clean_s
    for _ in range(kills):
        delay = rng.uniform(0.3, max(0.31, upper))
        started = time.monotonic()
        proc = subprocess.Popen(CLI + args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            report.killed_alive += 1
        if skips_done_s is not None:
            ran = min(delay, time.monotonic() - started)
            upper = max(skips_done_s, upper - ran + skips_done_s)
        out, err = proc.communicate()
        assert proc.returncode in (0, -signal.SIGKILL), f"{args} (kill at {delay:.2f}s): exit {proc.returncode}\n{out}\n{err}"
        report.kills += 1
        report.delays.append(round(delay, 2))
        args = resume()
    done = subprocess.run(CLI + args, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"resume {args} after kills at {report.delays}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    report.resumed_ok = True
    if os.environ.get("FAULTS_REPORT"):  # one JSON line per run, for the README's table
        with open(os.environ["FAULTS_REPORT"], "a") as f:
            f.write(json.dumps({"command": first[0], "kills": report.kills, "alive": report.killed_alive,
                                "delays": report.delays, "clean_s": round(clean_s, 2)}) + "\n")
    return report


def is_temporary(path: Path) -> bool:
    from patchscope.common.atomic import is_temporary_name

    return is_temporary_name(path.name)


def check_files(folder: Path) -> int:
    """Parse every file under `folder` by type; no temporary file may be left. Returns the count checked."""
    import torch
    from PIL import Image
    from safetensors import safe_open

    checked = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        assert not is_temporary(path), f"temporary file left: {path}"
        suffix = path.suffix
        if suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                for key in f.keys():
                    f.get_tensor(key)
        elif suffix == ".json":
            json.loads(path.read_text())
        elif suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        elif suffix == ".png":
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                image.load()
        elif suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=True)
        else:
            path.read_bytes()
        checked += 1
    return checked


def tree_bytes(folder: Path, suffixes: tuple[str, ...]) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.suffix in suffixes}


def safetensors_equal(a: Path, b: Path) -> bool:
    """Tensors bit for bit (the file's metadata may hold times)."""
    from safetensors.torch import load_file
    import torch

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x)
