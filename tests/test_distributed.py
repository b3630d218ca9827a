"""torchrun (DistributedDataParallel, gloo on CPU): train, eval and sample sharded over 2 processes give what one
process gives; only rank 0 writes; refusals reach every rank; a killed DDP run resumes.

Every multi-process test starts `torchrun --nproc_per_node 2 --standalone` in a subprocess with a timeout, so a
hang fails the test instead of blocking the suite.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from patchscope.common import distributed
from patchscope.common.errors import InputError

BIN = Path(sys.executable).parent
TRAIN = ["--model", "xception_block1", "--load-size", "32", "--crop-size", "32", "--batch-size", "32",
         "--precision", "fp32", "--device", "cpu", "--sync-bn"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1"}


def torchrun(args: list[str], timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    command = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--standalone", "--no-python",
               str(BIN / "patchscope"), "--threads", "1", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env(), **kwargs)


def single(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "patchscope"), "--threads", "1", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env())


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def train_args(data: Path, out: Path, epochs: int) -> list[str]:
    config = out.parent / "eval_batch.yaml"
    config.write_text("eval_batch_size: 6\n")  # several validation batches, sharded over the ranks
    return ["train", "--config", str(config), "--real", str(data / "real"), "--fake", str(data / "fake"),
            "--out", str(out), "--max-epochs", str(epochs), *TRAIN]


def assert_same_weights(a: Path, b: Path, atol: float) -> None:
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys()
    for key in x:
        torch.testing.assert_close(y[key], x[key], rtol=0, atol=atol, msg=key)


# ----------------------------------------------------------------------------- single process: no-ops

def test_without_torchrun_every_helper_is_a_no_op(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.setup(torch.device("cpu")) == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    distributed.barrier()
    assert distributed.all_gather_object(3) == [3] and distributed.broadcast_object("x") == "x"
    assert distributed.run_on_main(lambda a: a + 1, 1) == 2
    values, = distributed.gather_ordered(torch.tensor([2, 0, 1]), torch.tensor([20, 0, 10]))
    assert values.tolist() == [0, 10, 20]
    with pytest.raises(InputError):
        distributed.refuse("no")
    assert distributed.wait_for_main("demo") is True


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_refuses_an_explicit_gpu_index_alike(monkeypatch, rank):
    """cuda:0 suits rank 0's GPU only: refused on rank 0 too, before anything is initialised, so no rank goes on
    to wait in a collective for a rank that stopped."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(InputError, match=r"--device cuda:0: under torchrun each process takes the GPU of its "
                                         r"LOCAL_RANK; give --device cuda"):
        distributed.setup(torch.device("cuda", 0))
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("local_rank, local_world, gpus, share, expected", [
    (0, 2, 2, False, (0, "nccl")), (1, 2, 2, False, (1, "nccl")), (3, 4, 8, False, (3, "nccl")),
    (0, 2, 1, True, (0, "gloo")), (1, 2, 1, True, (0, "gloo")), (2, 3, 2, True, (0, "gloo")),
    (1, 1, 1, True, (0, "gloo")),  # a LOCAL_RANK past the GPUs (another launcher's numbering)
    (1, 2, 2, True, (1, "gloo")),  # the flag alone picks the backend, so machines with enough GPUs agree with the rest
])
def test_each_process_takes_its_own_gpu_or_shares_them_over_gloo(local_rank, local_world, gpus, share, expected):
    assert distributed.cuda_placement(local_rank, local_world, gpus, share) == expected


@pytest.mark.parametrize("local_rank, local_world, gpus", [(0, 2, 1), (1, 2, 1), (1, 1, 1), (0, 9, 8)])
def test_more_processes_than_gpus_are_refused_saying_what_to_give(local_rank, local_world, gpus):
    with pytest.raises(InputError, match=rf"torchrun started {max(local_world, local_rank + 1)} processes on this "
                                         rf"machine, which has {gpus} GPU.*give --nproc_per_node {gpus} or fewer, "
                                         r"or set PATCHSCOPE_SHARE_GPUS=1"):
        distributed.cuda_placement(local_rank, local_world, gpus, share=False)
    with pytest.raises(InputError, match="no CUDA GPU"):
        distributed.cuda_placement(local_rank, local_world, 0, share=True)


@pytest.mark.parametrize("rank", [0, 1])
def test_two_processes_on_one_gpu_are_refused_before_joining_the_first_of_the_machine_saying_why(monkeypatch,
                                                                                                  rank):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("PATCHSCOPE_SHARE_GPUS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device before the refusal"))
    with pytest.raises(InputError, match="NCCL cannot share a GPU") as caught:
        distributed.setup(torch.device("cuda"))
    assert getattr(caught.value, "quiet", False) == (rank == 1)  # rank 0 prints it, rank 1 exits 2 quietly
    assert not torch.distributed.is_initialized()


def test_a_cuda_launch_without_local_world_size_is_refused_on_every_rank(monkeypatch):
    """Without LOCAL_WORLD_SIZE, local rank 0 would see a GPU of its own, join, and wait for a rank 1 that refused."""
    for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device before the refusal"))
    with pytest.raises(InputError, match="LOCAL_WORLD_SIZE is not set: start the processes with torchrun") as caught:
        distributed.setup(torch.device("cuda"))
    assert not getattr(caught.value, "quiet", False)


def test_a_launch_of_one_process_is_single(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.world_size() == 1 and not distributed.launched()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.world_size() == 2 and distributed.rank() == 1 and not distributed.is_main()
    with distributed.alone():
        assert distributed.world_size() == 1 and distributed.is_main()
    with pytest.raises(InputError) as caught:
        distributed.refuse("batch")
    assert getattr(caught.value, "quiet", False)  # rank 0 prints it, this rank exits 2 quietly


def test_ddp_steps_union_into_the_single_process_batches():
    from patchscope.forensics.batching import BalancedBatchSampler

    whole = list(BalancedBatchSampler(10, 7, 8, seed=3))
    shards = [list(BalancedBatchSampler(10, 7, 4, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for step, batch in enumerate(whole):
        assert sorted(shards[0][step] + shards[1][step]) == sorted(batch)


# ----------------------------------------------------------------------------- gradients: tight equality

GRADIENTS = '''
import torch
from patchscope.common import distributed
from patchscope.forensics import distributed_train
from patchscope.forensics.models import build_model
from patchscope.forensics.scoring import patch_cross_entropy
torch.set_num_threads(1)
device = distributed.setup(torch.device("cpu"))
rank, world = distributed.rank(), distributed.world_size()
x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
reference = build_model("xception_block1", seed=0).train()
patch_cross_entropy(reference(x), y).backward()
model = distributed_train.sync_batchnorm(build_model("xception_block1", seed=0), device)
step = distributed_train.wrap(model, device).train()
mine = torch.tensor([i for i in range(8) if (i // 2) % world == rank])  # 1 real + 1 fake pair per rank and half
patch_cross_entropy(step(x[mine]), y[mine]).backward()
for (name, a), b in zip(reference.named_parameters(), model.parameters()):
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-7, msg=name)
for (name, a), b in zip(reference.named_buffers(), model.buffers()):
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=name)
print("GRADIENTS EQUAL", rank)
'''


def test_ddp_with_sync_bn_gives_the_single_process_gradients_and_statistics(tmp_path):
    script = tmp_path / "gradients.py"
    script.write_text(GRADIENTS)
    result = subprocess.run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--standalone", str(script)],
                            capture_output=True, text=True, timeout=180, env=_env())
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("GRADIENTS EQUAL") == 2


# ----------------------------------------------------------------------------- train, resume, eval

def _wait_for_epoch(out: Path, epoch: int, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        manifest = out / "checkpoint.json"
        try:
            if json.loads(manifest.read_text())["epoch"] >= epoch:
                return
        except (OSError, ValueError, KeyError):
            pass
        assert process.poll() is None, "training ended before it could be killed"
        time.sleep(0.2)
    raise AssertionError(f"epoch {epoch} was not committed in time")


@pytest.mark.slow  # about 110 s on 2 cores: three training runs, a resume and two evals
def test_ddp_training_matches_one_process_resumes_after_a_kill_and_evaluates_alike(builtin_dataset, tmp_path):
    data = builtin_dataset
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    ok(single(train_args(data, one, 3)))
    ok(torchrun(train_args(data, two, 3)))

    # Same global batches; gradients agree to rounding (the test above), but Adam moves a parameter by about
    # lr * sign(gradient) while its history is short, so a gradient that is zero up to rounding (a bias before a
    # balanced softmax) can go either way and the difference spreads: weights stay within Adam's bound of
    # 2 * lr per step (3 epochs x 6 steps), the first epoch's loss and metrics agree closely.
    assert_same_weights(one / "last.safetensors", two / "last.safetensors", atol=2 * 1e-3 * 18)
    lines = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (one, two)]
    assert [line["images"] for line in lines[1]] == [line["images"] for line in lines[0]]
    assert lines[1][0]["train_loss"] == pytest.approx(lines[0][0]["train_loss"], rel=1e-4)
    assert lines[1][0]["val_ap"] == pytest.approx(lines[0][0]["val_ap"], abs=0.02)

    # world_size recorded in config and checkpoint metadata; rank 1 left no file of its own
    assert "world_size: 2" in (two / "config.yaml").read_text()
    assert "world_size: 1" in (one / "config.yaml").read_text()
    assert json.loads((two / "last.json").read_text())["world_size"] == 2
    assert json.loads((two / "last.json").read_text())["config"]["world_size"] == 2

    # SIGKILL the whole torchrun group after epoch 1, resume with torchrun: the uninterrupted run's weights
    process = subprocess.Popen([str(BIN / "torchrun"), "--nproc_per_node", "2", "--standalone", "--no-python",
                                str(BIN / "patchscope"), "--threads", "1", *train_args(data, killed, 3)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                               start_new_session=True)
    try:
        _wait_for_epoch(killed, 1, process)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    ok(torchrun([*train_args(data, killed, 3), "--resume"]))
    assert_same_weights(two / "last.safetensors", killed / "last.safetensors", atol=0)
    assert (killed / "metrics.jsonl").read_text().count("\n") == 3
    # a resume on one process is allowed (world_size is like --device) and finds the run finished
    ok(single([*train_args(data, killed, 3), "--resume"]))

    # eval sharded over 2 processes writes what one process writes: metrics.json and the scores CSV byte for byte
    test = f"builtin={data / 'real'},{data / 'fake'}"
    for runner, out in ((single, tmp_path / "eval1"), (torchrun, tmp_path / "eval2")):
        ok(runner(["eval", str(two), "--test", test, "--out", str(out), "--batch-size", "7", "--device", "cpu",
                   "--precision", "fp32"]))
    assert (tmp_path / "eval2" / "metrics.json").read_bytes() == (tmp_path / "eval1" / "metrics.json").read_bytes()
    assert ((tmp_path / "eval2" / "scores_builtin.csv").read_bytes()
            == (tmp_path / "eval1" / "scores_builtin.csv").read_bytes())


def test_a_global_batch_the_ranks_cannot_split_is_refused_once_and_no_rank_hangs(builtin_dataset, tmp_path):
    args = train_args(builtin_dataset, tmp_path / "run", 1)
    args[args.index("--batch-size") + 1] = "6"  # 3 per rank: not half real, half fake
    result = torchrun(args, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "--batch-size 6" in errors[0] and "multiple of 4" in errors[0], result.stderr[-3000:]
    assert "exitcode  : 2" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_refusal_of_rank_0_reaches_every_rank(builtin_dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something.txt").write_text("not a run")
    result = torchrun(train_args(builtin_dataset, out, 1), timeout=120)
    assert result.returncode != 0
    assert len([line for line in result.stderr.splitlines() if line.startswith("error: ")]) == 1
    assert sorted(p.name for p in out.iterdir()) == ["something.txt"]


# ----------------------------------------------------------------------------- sample

def test_sharded_sampling_writes_the_single_process_pngs_byte_for_byte(tmp_path):
    from tests.tiny_models import save_tiny_pgan

    generator = save_tiny_pgan(tmp_path / "tiny.pt", seed=0)
    args = ["--train", "7", "--val", "3", "--chunk", "2", "--batch-size", "2", "--device", "cpu", "--seed", "5"]
    ok(single(["sample", str(generator), "--out", str(tmp_path / "one"), *args]))
    ok(torchrun(["sample", str(generator), "--out", str(tmp_path / "two"), *args]))
    for split in ("train", "val"):
        names = sorted(p.name for p in (tmp_path / "one" / split).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "two" / split).iterdir())
        assert len(names) == {"train": 7, "val": 3}[split]
        for name in names:
            assert (tmp_path / "two" / split / name).read_bytes() == (tmp_path / "one" / split / name).read_bytes()
    manifests = [json.loads((tmp_path / run / "manifest.json").read_text()) for run in ("one", "two")]
    assert manifests[0] == manifests[1]
    # resume with more images: the existing ones are kept, the new ones match one process's
    (tmp_path / "two" / "train" / "000003.png").unlink()
    ok(torchrun(["sample", str(generator), "--out", str(tmp_path / "two"), *args]))
    assert ((tmp_path / "two" / "train" / "000003.png").read_bytes()
            == (tmp_path / "one" / "train" / "000003.png").read_bytes())


def test_a_command_that_is_not_sharded_runs_once_on_rank_0_with_one_process_s_result(tmp_path):
    """invert under torchrun: rank 0 alone does the work (the other rank waits and exits 0), so the latents and
    metrics are those of one process, written once."""
    from tests.tiny_models import save_tiny_pgan

    generator = save_tiny_pgan(tmp_path / "tiny.pt", seed=0)
    ok(single(["sample", str(generator), "--out", str(tmp_path / "images"), "--train", "3", "--val", "0",
               "--device", "cpu", "--seed", "5"]))
    args = ["invert", "--generator", str(generator), "--images", str(tmp_path / "images" / "train"), "--steps", "3",
            "--batch-size", "2", "--lambda-lpips", "0", "--device", "cpu"]
    ok(single([*args, "--out", str(tmp_path / "one")]))
    two = ok(torchrun([*args, "--out", str(tmp_path / "two")]))
    assert "invert is not sharded: rank 0 runs it alone" in two.stderr
    assert two.stdout.count('"out"') == 1  # the summary, printed by rank 0 only
    names = sorted(p.name for p in (tmp_path / "one").iterdir() if p.suffix in (".png", ".json"))
    assert "metrics.json" in names and len(names) >= 4
    for name in names:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name
