"""Running one entry point of patchscope on one hostile file, in this process or in a bounded child, and the
naive loaders a control runs the payloads with. Used by `tests/test_hostile_files.py`.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

from click.testing import CliRunner

from patchscope.cli import main
from patchscope.common.errors import InputError

ROOT = Path(__file__).resolve().parents[3]
TIMEOUT = 60           # s per job: every refusal takes a fraction of that, a hang never ends
HEADROOM = 3 << 30     # bytes of address space a child may add to what its imports took


def command(entry: str, role: str, file: str, good: str, out: str) -> list[str]:
    """The command line of `entry` with the hostile `file` in `role` and good inputs for everything else."""
    generator = f"{good}/pgan.pt" if role == "classifier" else file
    run = f"{good}/run" if role == "generator" else file
    reals, fakes, cpu = f"{good}/reals", f"{good}/fakes", ("--device", "cpu")
    lines = {
        "sample": ["sample", generator, "--out", out, "--train", "1", "--val", "0", "--test", "0", "--size", "16",
                   "--writers", "1", *cpu],
        "prepare": ["prepare", reals, "--generator", generator, "--out", out, "--workers", "1"],
        "invert": ["invert", "--generator", generator, "--images", reals, "--out", out, "--steps", "1",
                   "--lambda-lpips", "0", *cpu],
        "exaggerate": ["exaggerate", "--generator", generator, "--classifier", run, "--out", out, "--steps", "1",
                       "--batch-size", "2", "--eval-n", "2", "--eval-batch-size", "2", "--grid-rows", "0",
                       "--lpips-random", *cpu],
        "finetune": ["finetune", "--generator", generator, "--classifier", run, "--real", reals, "--out", out,
                     "--steps", "1", "--batch-size", "2", "--lpips-random", *cpu],
        "retrain": ["retrain", "--classifier", run, "--generator", generator, "--real", reals,
                    "--original-fakes", fakes, "--out", out, *cpu],
        "eval": ["eval", run, "--test", f"t={reals},{fakes}", "--out", out, *cpu],
        "patches": ["patches", run, "--real", reals, "--fake", fakes, "--out", out, "-n", "1", *cpu],
        "report": ["report", file, "--out", f"{out}/report.html"],
    }
    return lines[entry]


def run_entry(entry: str, role: str, file: str, good: str, out: str) -> dict:
    """Exit code, stderr and any escaped exception (with its traceback) of one entry point on one file."""
    if entry in ("load_generator", "load_classifier"):
        from patchscope.forensics.checkpoint import load_classifier
        from patchscope.generators import load_generator

        try:
            (load_generator if entry == "load_generator" else load_classifier)(file)
        except InputError as error:
            return {"code": 2, "stderr": f"error: {error}\n", "exception": None}
        except BaseException:
            return {"code": 1, "stderr": "", "exception": traceback.format_exc()}
        return {"code": 0, "stderr": "", "exception": None}
    handlers = logging.root.handlers[:]
    logging.root.handlers = []  # the command's basicConfig logs to this run's stderr
    try:
        result = CliRunner().invoke(main, command(entry, role, file, good, out))
    finally:
        logging.root.handlers = handlers
    escaped = result.exception is not None and not isinstance(result.exception, SystemExit)
    return {"code": result.exit_code, "stderr": result.stderr + result.stdout,
            "exception": "".join(traceback.format_exception(*result.exc_info)) if escaped else None}


CHILD = """
import json, signal, sys
from tests.data.hostile.runner import TIMEOUT, run_entry

def hang(signum, frame):
    raise TimeoutError(f"still running after {TIMEOUT} s: a hang")

signal.signal(signal.SIGALRM, hang)  # interrupts a blocking open or read too
results = []
for job in json.loads(sys.argv[1]):
    signal.alarm(TIMEOUT)
    results.append(run_entry(*job))
    signal.alarm(0)
print("RESULTS " + json.dumps(results))
"""


def _address_space() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))


def run_bounded(jobs: list[tuple]) -> list[dict]:
    """`run_entry` of each job in one child under RLIMIT_AS, each job within TIMEOUT: a memory bomb fails as
    a crash, a hang as a timeout, and neither takes the machine or the test session with it."""
    import resource

    limit = _address_space() + HEADROOM  # this process has made the same imports as the child will

    def bound() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2", "PYTHONPATH": str(ROOT)}
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(jobs)], capture_output=True, text=True,
                              timeout=TIMEOUT * (len(jobs) + 2), cwd=ROOT, env=env, preexec_fn=bound)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the child outlived its per-job alarms (a hang): {jobs}") from None
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, f"the child crashed (exit {done.returncode}): {done.stderr[-3000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


def naive_loads(gen: Path) -> dict[str, object]:
    """What a trusting reader does with each payload file: plain unpickling, `torch.load(weights_only=False)`,
    `np.load(allow_pickle=True)`, and exec of the source TF and NVlabs pickles carry."""
    import pickle

    import numpy as np
    import torch

    from patchscope.generators.io.safe_pickle import load_pickle

    def unpickle(name: str):
        return lambda: pickle.loads((gen / name).read_bytes())

    def torch_load(name: str):
        return lambda: torch.load(gen / name, weights_only=False)

    def run_source(name: str, key: str):
        def load():
            networks = load_pickle(gen / name)
            record = networks[0] if isinstance(networks, tuple) else networks["G_ema"]
            exec(record.state[key] if key in (record.state or {}) else record.args[0][key], {})
        return load

    return {**{case: unpickle(f"{case}.pkl") for case in (
                "pickle_os_system", "pickle_getattr", "pickle_partial_eval", "pickle_partial_system",
                "pickle_rebuild_payload", "pickle_numpy_object_list")},
            **{case: torch_load(f"{case}.pt") for case in ("zip_os_system", "zip_getattr", "zip_partial_eval")},
            "npz_object": lambda: np.load(gen / "npz_object.npz", allow_pickle=True)["weights"],
            "tf_pgan_stub": run_source("tf_pgan_stub.pkl", "build_module_src"),
            "tf_stylegan_stub": run_source("tf_stylegan_stub.pkl", "build_module_src"),
            "nvlabs_class_path": run_source("nvlabs_class_path.pkl", "module_src")}
