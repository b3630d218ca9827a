"""torch.compile with a way back to eager execution.

`--compile` is a speed setting, never a reason for a run to fail: where the compiler cannot run (the CPU backend
needs a C++ compiler, the CUDA one Triton) or the first compiled call fails, the run goes on uncompiled after one
warning. Results do not depend on it beyond floating-point rounding: random numbers drawn inside a compiled module
(dropout, a generator's fresh noise) are those an uncompiled one draws, from the same generator (`COMPILE_OPTIONS`).
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shlex
import shutil
from typing import Any

import torch

log = logging.getLogger("patchscope.compile")

CXX_CANDIDATES = ("g++", "c++", "clang++")
# Inductor's own random numbers differ from eager ones and leave the global generator elsewhere; falling back to
# PyTorch's random ops keeps a compiled run's draws (and every draw after them) those of an uncompiled run.
COMPILE_OPTIONS = {"fallback_random": True}


def missing_compiler(device: torch.device) -> str | None:
    """Why torch.compile's default backend cannot build kernels for `device` here, or None when it can."""
    if device.type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "Triton is not installed"
    if device.type == "cpu":
        given = shlex.split(os.environ.get("CXX", ""))[:1]
        if any(shutil.which(name) for name in (*given, *CXX_CANDIDATES)):
            return None
        return f"no C++ compiler ({', '.join(given or CXX_CANDIDATES)}) on PATH"
    return None


class CompiledOrEager(torch.nn.Module):
    """Calls `torch.compile(module)`; if a call fails to compile, warns once and calls `module` itself from then
    on. The first call may fail in any way (it is where compiling starts); a later one falls back only for the
    compiler's own errors (a recompile for a new shape or mode), so a genuine error in the model is never retried
    silently: it raises again from the uncompiled call. Each compiled call also compiles its backward pass (torch
    does that lazily, inside `loss.backward()`, where no fallback could catch it). train()/eval() reach `module` as
    usual; the state dict is the module's own (under `module.`)."""

    def __init__(self, module: torch.nn.Module, compiled: Any, what: str):
        super().__init__()
        self.module = module
        object.__setattr__(self, "_compiled", compiled)  # shares module's parameters: not registered twice
        self._what, self._proven = what, False

    @property
    def compiled(self) -> bool:
        """False once the run fell back to eager."""
        return self._compiled is not self.module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.compiled:
            return self.module(*args, **kwargs)
        try:
            with _backward_compiled_in_forward():
                out = self._compiled(*args, **kwargs)
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as error:  # BackendCompilerFailed, InductorError, a missing header, ...
            if self._proven and not isinstance(error, _COMPILER_ERRORS):
                raise
            log.warning("torch.compile of %s failed (%s); running it uncompiled", self._what, _cause(error))
            object.__setattr__(self, "_compiled", self.module)
            out = self.module(*args, **kwargs)
        self._proven = True
        return out


def _compiler_errors() -> tuple[type[BaseException], ...]:
    try:
        from torch._dynamo.exc import TorchDynamoException  # BackendCompilerFailed, InductorError, ...
    except ImportError:
        return ()
    return (TorchDynamoException,)


_COMPILER_ERRORS = _compiler_errors()


def _backward_compiled_in_forward():
    """AOTAutograd's switch that lowers the backward graph with the forward one, where this torch has it."""
    config = getattr(getattr(torch, "_functorch", None), "config", None)
    if config is None or not hasattr(config, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return config.patch(force_non_lazy_backward_lowering=True)


def _cause(error: BaseException) -> str:
    """`Type: first line` of what went wrong: the inner exception of a BackendCompilerFailed, whose own first
    line only names the backend."""
    inner = getattr(error, "inner_exception", None) or error
    lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
    return f"{type(inner).__name__}: {lines[0][:300]}" if lines else type(inner).__name__


def maybe_compile(module: torch.nn.Module, enabled: bool, device: torch.device,
                  what: str = "the model") -> torch.nn.Module:
    """`module` compiled when `enabled` and the compiler can run on `device` (else `module`, with a warning)."""
    if not enabled:
        return module
    missing = missing_compiler(device)
    if missing is not None:
        log.warning("--compile: %s, so %s runs uncompiled", missing, what)
        return module
    return CompiledOrEager(module, torch.compile(module, options=COMPILE_OPTIONS), what)
