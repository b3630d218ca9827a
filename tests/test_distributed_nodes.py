"""torchrun across machines, simulated on one: two "nodes" of one process each meet at a c10d rendezvous endpoint,
as the README's two-machine example does. Each process has LOCAL_RANK 0 (its node's first device) but a different
RANK, so anything that mistook the local rank for the global one (two writers, two claims of the run folder, a
shard taken twice) fails here while the one-node tests pass.
"""
from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.test_distributed import BIN, _env, ok, single, torchrun, train_args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list[str], timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """The same torchrun command started twice, as on two machines, one process per node."""
    command = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{_free_port()}", "--rdzv_id", "patchscope-nodes", "--no-python",
               str(BIN / "patchscope"), "--threads", "1", *args]
    nodes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
             for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    return [subprocess.CompletedProcess(command, node.returncode, out, err)
            for node, (out, err) in zip(nodes, outputs)]


def node_train_args(data: Path, out: Path) -> list[str]:
    """Not the one-node tests' shape: 40 px loads under 32 px random crops, a global batch of 16 (8 per rank)."""
    args = train_args(data, out, 2)
    args[args.index("--load-size") + 1] = "40"
    args[args.index("--batch-size") + 1] = "16"
    return args


def ok_nodes(results: list[subprocess.CompletedProcess]) -> None:
    for result in results:
        ok(result)


@pytest.mark.slow  # about 60 s on 2 cores: three short trainings, two evals, two samplings
def test_two_nodes_train_eval_and_sample_as_two_processes_on_one_node_do(builtin_dataset, tmp_path):
    data = builtin_dataset
    one_node, nodes = tmp_path / "one_node", tmp_path / "nodes"
    ok(torchrun(node_train_args(data, one_node)))
    ok_nodes(two_nodes(node_train_args(data, nodes)))

    # the same ranks, batches and reductions: the same weights bit for bit, and the run written once
    a, b = load_file(one_node / "last.safetensors"), load_file(nodes / "last.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    timing = {"seconds", "images_per_s"}
    lines = [[{k: v for k, v in json.loads(line).items() if k not in timing}
              for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one_node, nodes)]
    assert len(lines[1]) == 2 and lines[1] == lines[0]
    assert json.loads((nodes / "last.json").read_text())["world_size"] == 2
    # both nodes resume it: rank 0 finds it finished, the other node follows without claiming it again
    ok_nodes(two_nodes([*node_train_args(data, nodes), "--resume"]))
    assert (nodes / "metrics.jsonl").read_text().count("\n") == 2

    # sharded eval: byte for byte the single-process files
    test = f"builtin={data / 'real'},{data / 'fake'}"
    eval_args = ["--test", test, "--batch-size", "7", "--device", "cpu", "--precision", "fp32"]
    ok(single(["eval", str(nodes), "--out", str(tmp_path / "eval1"), *eval_args]))
    ok_nodes(two_nodes(["eval", str(nodes), "--out", str(tmp_path / "eval2"), *eval_args]))
    for name in ("metrics.json", "scores_builtin.csv"):
        assert (tmp_path / "eval2" / name).read_bytes() == (tmp_path / "eval1" / name).read_bytes()

    # sharded sampling: node r renders its chunks, the union is one process's PNGs byte for byte
    from tests.tiny_models import save_tiny_pgan

    generator = save_tiny_pgan(tmp_path / "tiny.pt", seed=0)
    sample_args = ["--train", "5", "--val", "2", "--chunk", "2", "--batch-size", "2", "--device", "cpu", "--seed", "3"]
    ok(single(["sample", str(generator), "--out", str(tmp_path / "s1"), *sample_args]))
    ok_nodes(two_nodes(["sample", str(generator), "--out", str(tmp_path / "s2"), *sample_args]))
    for split, count in (("train", 5), ("val", 2)):
        names = sorted(p.name for p in (tmp_path / "s1" / split).iterdir())
        assert len(names) == count
        assert names == sorted(p.name for p in (tmp_path / "s2" / split).iterdir())
        for name in names:
            assert (tmp_path / "s2" / split / name).read_bytes() == (tmp_path / "s1" / split / name).read_bytes()
