"""`--compile` never stops a run: without a compiler, or when the first compiled call fails, the model runs eagerly
after one warning; a real error in the model still raises; a working compile gives the eager outputs."""
from __future__ import annotations

import logging

import pytest
import torch

from patchscope.common import compiled
from patchscope.common.compiled import CompiledOrEager, maybe_compile, missing_compiler

CPU = torch.device("cpu")


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())


def test_disabled_is_the_module_itself():
    net = _net()
    assert maybe_compile(net, False, CPU) is net


def test_without_a_cpp_compiler_it_runs_eagerly_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(compiled.shutil, "which", lambda name: None)
    monkeypatch.setenv("CXX", "my-cxx --flag")
    assert missing_compiler(CPU) == "no C++ compiler (my-cxx) on PATH"
    monkeypatch.delenv("CXX")
    assert missing_compiler(CPU) == "no C++ compiler (g++, c++, clang++) on PATH"
    net = _net()
    with caplog.at_level(logging.WARNING, logger="patchscope.compile"):
        assert maybe_compile(net, True, CPU, what="the classifier") is net
    assert [r.getMessage() for r in caplog.records] == [
        "--compile: no C++ compiler (g++, c++, clang++) on PATH, so the classifier runs uncompiled"]


def test_cuda_needs_triton(monkeypatch):
    monkeypatch.setattr(compiled.importlib.util, "find_spec", lambda name: None)
    assert missing_compiler(torch.device("cuda")) == "Triton is not installed"


def test_a_failing_first_call_falls_back_once_with_the_eager_outputs(caplog):
    net, calls = _net(), []

    def broken(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("C++ compile error\nmore lines that are not shown")

    wrapper = CompiledOrEager(net, broken, "the classifier")
    x = torch.randn(2, 3, 9, 7)
    with caplog.at_level(logging.WARNING, logger="patchscope.compile"):
        first = wrapper(x)
        second = wrapper(x)
    assert len(calls) == 1 and not wrapper.compiled  # tried once, then never again
    assert torch.equal(first, net(x)) and torch.equal(second, net(x))
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile of the classifier failed (RuntimeError: C++ compile error); running it uncompiled"]
    # train()/eval() and the parameters are the module's own
    wrapper.eval()
    assert not net.training
    assert [n for n, _ in wrapper.named_parameters()] == [f"module.{n}" for n, _ in net.named_parameters()]


def test_a_real_error_in_the_model_is_not_hidden():
    def broken(*args, **kwargs):
        raise RuntimeError("compile failed")

    wrapper = CompiledOrEager(_net(), broken, "the classifier")
    with pytest.raises(RuntimeError, match="channels"):  # the eager call's own error: 5 channels, not 3
        wrapper(torch.randn(1, 5, 8, 8))


@pytest.mark.slow
@pytest.mark.skipif(missing_compiler(CPU) is not None, reason="torch.compile needs a C++ compiler here")
def test_a_working_compile_matches_eager():
    net = _net().eval()
    x = torch.randn(3, 3, 11, 10).contiguous(memory_format=torch.channels_last)
    wrapper = maybe_compile(net, True, CPU)
    with torch.no_grad():
        got, want = wrapper(x), net(x)
    assert isinstance(wrapper, CompiledOrEager) and wrapper.compiled
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Noisy(torch.nn.Module):
    """Random numbers inside the forward: fresh noise (as StyleGAN2's `noise_mode="random"`) and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.drop = torch.nn.Conv2d(3, 4, 3), torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.conv(x + torch.randn_like(x)))


@pytest.mark.slow
@pytest.mark.skipif(missing_compiler(CPU) is not None, reason="torch.compile needs a C++ compiler here")
def test_a_compiled_module_draws_the_random_numbers_of_the_uncompiled_one_and_leaves_the_generator_alike():
    torch.manual_seed(0)
    net, x = _Noisy().train(), torch.randn(2, 3, 8, 8)
    wrapper = maybe_compile(net, True, CPU)
    runs = []
    for module in (wrapper, net):
        torch.manual_seed(1)
        runs.append((module(x).detach(), module(x).detach(), torch.rand(3)))  # two calls, then a draw after them
    assert isinstance(wrapper, CompiledOrEager) and wrapper.compiled
    # inductor's own random numbers would differ entirely (dropout masks, noise) and move the generator elsewhere
    for got, want in zip(*runs):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_backward_that_fails_to_compile_falls_back_in_the_forward_call(caplog):
    """torch lowers the backward graph lazily, inside loss.backward(), out of the wrapper's reach: the wrapper has
    it lowered with the forward one, so its failure falls back there and backward() then runs uncompiled."""
    from torch._dynamo.backends.common import aot_autograd

    def backward_fails(graph, example_inputs):
        raise RuntimeError("simulated backward codegen failure")

    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh())
    compiled_net = torch.compile(net, backend=aot_autograd(fw_compiler=lambda gm, _: gm, bw_compiler=backward_fails))
    wrapper = CompiledOrEager(net, compiled_net, "the classifier")
    x = torch.randn(5, 4)
    with caplog.at_level(logging.WARNING, logger="patchscope.compile"):
        wrapper(x).sum().backward()
    assert not wrapper.compiled and net[0].weight.grad is not None
    assert "simulated backward codegen failure" in caplog.records[0].getMessage()
    torch._dynamo.reset()


def test_a_later_compiler_error_falls_back_but_a_later_model_error_raises(caplog):
    from torch._dynamo.exc import BackendCompilerFailed

    net, calls = _net(), []

    def compiled_then_failing(x):
        calls.append(x.shape)
        if len(calls) == 2:  # a recompile for a new shape
            raise BackendCompilerFailed(lambda *a: None, RuntimeError("Python.h: No such file or directory"), None)
        return net(x)

    wrapper = CompiledOrEager(net, compiled_then_failing, "the classifier")
    wrapper(torch.randn(2, 3, 8, 8))
    with caplog.at_level(logging.WARNING, logger="patchscope.compile"):
        wrapper(torch.randn(1, 3, 9, 9))
    assert not wrapper.compiled
    assert caplog.records[0].getMessage() == ("torch.compile of the classifier failed (RuntimeError: Python.h: No "
                                              "such file or directory); running it uncompiled")

    def compiled_then_model_error(x):
        if x.shape[1] != 3:
            raise RuntimeError("expected 3 channels")
        return net(x)

    wrapper = CompiledOrEager(net, compiled_then_model_error, "the classifier")
    wrapper(torch.randn(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match="expected 3 channels"):  # not hidden behind an eager retry
        wrapper(torch.randn(2, 5, 8, 8))
    assert wrapper.compiled
