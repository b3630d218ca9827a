"""Generators of your own, named `MODULE:CALLABLE`, beside the checkpoint files `load_generator` reads.

`open_generator(spec)` is what every command calls: an existing file goes to `load_generator` (which never runs
code from it); any other `MODULE:CALLABLE` imports MODULE (from the current folder or the environment: the user's
own code), calls CALLABLE() and takes what it returns: a patchscope `Generator`, or any `torch.nn.Module` mapping
latents [N, latent_dim] to images [N, 3, R, R] in [-1, 1], which `ModuleGenerator` adapts (a `StyleGenerator` when
it has `mapping` and `synthesis`). `--weights FILE` (safetensors) loads a state dict into it, strictly: what a
finetuned generator of this kind is saved as (`user_state_dict`). Every failure is one line of InputError.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from patchscope.common.errors import InputError
from patchscope.generators.base import Generator, StyleGenerator
from patchscope.generators.custom_weights import load_with_loose_buffers, one_line, read_weights, with_loose_buffers
from patchscope.generators.io.formats import checkpoint_sha256, load_generator

SPEC = re.compile(r"^([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
LATENT_NAMES = ("latent_dim", "z_dim", "nz")
RESOLUTION_NAMES = ("resolution", "img_resolution", "image_size")
# A probe image beyond this is no [-1, 1] image (a [0, 255] output, say); a little overshoot is tolerated,
# as random or freshly trained GANs give it.
LARGEST_VALUE = 2.0
MODULE_FORMAT = "module"          # `Generator.format` of an opened MODULE:CALLABLE
WRITTEN_FORMAT = "safetensors"    # how a finetuned one is written: its state dict, for --weights
DISCRIMINATOR = "discriminator."  # prefix of the discriminator's entries in that state dict


@dataclass(frozen=True)
class ModuleSource:
    """Where a MODULE:CALLABLE generator came from, for provenance records."""

    spec: str
    module_file: str | None
    module_sha256: str | None
    weights: str | None
    weights_sha256: str | None


def is_module_spec(spec: str | os.PathLike) -> bool:
    """Whether `spec` names a MODULE:CALLABLE rather than a file (an existing file always wins)."""
    text = os.fspath(spec)
    return not Path(text).exists() and SPEC.match(text) is not None


def module_source(generator: nn.Module) -> ModuleSource | None:
    """The MODULE:CALLABLE a generator was opened from, or None for one read from a checkpoint file."""
    return getattr(generator, "module_source", None)


def open_generator(spec: str | os.PathLike, weights: str | os.PathLike | None = None, latent_dim: int | None = None,
                   resolution: int | None = None) -> Generator:
    """The generator `spec` names: `load_generator(spec)` for a file, else MODULE:CALLABLE (see the module).

    weights: a safetensors state dict loaded strictly into the callable's network (MODULE:CALLABLE only);
    latent_dim, resolution: for a plain module without such attributes (an attribute that disagrees is refused).
    """
    text = os.fspath(spec)
    if not SPEC.match(text) or Path(text).exists():
        given = [flag for flag, value in (("--weights", weights), ("--latent-dim", latent_dim),
                                          ("--resolution", resolution)) if value]
        if given and text:
            raise InputError(f"{text}: {', '.join(given)} only apply to a MODULE:CALLABLE generator; a checkpoint "
                             f"file holds its own weights and sizes")
        return load_generator(text)  # a missing file: "no such checkpoint file"
    module_name, attribute = SPEC.match(text).groups()
    with _current_folder_importable():
        module = _import(text, module_name)
        factory = _attribute(text, module, attribute)
        built = _call(text, factory)
    if isinstance(built, Generator):
        generator = built
        if latent_dim or resolution:
            raise InputError(f"{text}: returned a patchscope Generator, which sets its own sizes; drop "
                             f"--latent-dim/--resolution")
    elif isinstance(built, nn.Module):
        generator = ModuleGenerator.wrap(text, built, latent_dim, resolution)
    else:
        raise InputError(f"{text}: {attribute}() returned {type(built).__name__}; expected a patchscope Generator "
                         f"or a torch.nn.Module")
    if weights:
        load_user_weights(generator, read_weights(weights), f"{weights} (for {text})")
    generator.eval()
    if isinstance(generator, ModuleGenerator):
        try:
            generator.measure()
        except InputError:
            raise
        except Exception as err:  # the user's forward or mapping: a wrong latent_dim, a bug in their code
            raise InputError(f"{text}: one latent [1, {generator.latent_dim}] through it raised "
                             f"{type(err).__name__}: {one_line(err)}") from None
    _check_output(text, generator)
    module_file = getattr(module, "__file__", None)
    generator.module_source = ModuleSource(
        text, module_file, checkpoint_sha256(module_file) if module_file else None,
        os.fspath(weights) if weights else None, checkpoint_sha256(weights) if weights else None)
    if generator.format == "unknown":
        generator.format = MODULE_FORMAT
    return generator


# ----------------------------------------------------------------------------- the adapter

class ModuleGenerator(Generator):
    """A plain `nn.Module` (`net`: latents [N, latent_dim] -> images [N, 3, R, R]) as a patchscope Generator.

    Its `discriminator` attribute, when it is a module, moves out of `net` to `.discriminator`, so the
    generator's parameters are its own; `user_state_dict` puts it back under `discriminator.` for saving.
    Latents come from the base class' seeded stream unless `net` has its own `sample_latents(n, seed, start)`.
    """

    format = MODULE_FORMAT

    def __init__(self, net: nn.Module, latent_dim: int, resolution: int | None) -> None:
        super().__init__()
        discriminator = net._modules.pop("discriminator", None)  # registered submodules live in _modules
        self.net = net
        self.latent_dim = latent_dim
        self.resolution = resolution  # None until `measure`
        self.own_latents = callable(getattr(net, "sample_latents", None))
        if discriminator is not None:
            self.discriminator = discriminator

    @staticmethod
    def wrap(spec: str, net: nn.Module, latent_dim: int | None, resolution: int | None) -> ModuleGenerator:
        latent_dim = _size(spec, net, LATENT_NAMES, latent_dim, "--latent-dim")
        if latent_dim is None:
            raise InputError(f"{spec}: the module has no latent_dim (nor z_dim, nz) attribute; pass --latent-dim N")
        resolution = _size(spec, net, RESOLUTION_NAMES, resolution, "--resolution")
        style = callable(getattr(net, "mapping", None)) and callable(getattr(net, "synthesis", None))
        return (ModuleStyleGenerator if style else ModuleGenerator)(net, latent_dim, resolution)

    @property
    def stock_latents(self) -> bool:
        """Whether latents are the base class' stream (`generators.sampling` then draws them in one pass)."""
        return not self.own_latents

    def sample_latents(self, n: int, seed: int = 0, start: int = 0) -> torch.Tensor:
        if not self.own_latents:
            return super().sample_latents(n, seed, start)
        z = self.net.sample_latents(n, seed, start)
        if not isinstance(z, torch.Tensor) or tuple(z.shape) != (n, self.latent_dim):
            shape = list(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise InputError(f"{type(self.net).__name__}.sample_latents({n}, {seed}, {start}) returned {shape}; "
                             f"expected [{n}, {self.latent_dim}]")
        return z.float().cpu()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    @torch.no_grad()
    def measure(self) -> None:
        """Without a declared resolution, measure it: one forward pass of one latent (on the module's device)."""
        if self.resolution is None:
            out = self._probe()
            if not isinstance(out, torch.Tensor) or out.ndim != 4:
                shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise InputError(f"{type(self.net).__name__} returned {shape} for one latent; expected "
                                 f"[1, 3, R, R] images")
            self.resolution = int(out.shape[-1])

    def _probe(self) -> torch.Tensor:
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        return self.forward(self.sample_latents(1, 0).to(device))


class ModuleStyleGenerator(ModuleGenerator, StyleGenerator):
    """A module with `mapping(z)` -> w ([N, w_dim] or [N, num_ws, w_dim]) and `synthesis(w)` -> images: w space
    works as for the StyleGANs (exaggerate --space w, invert --space w/w+). It has no truncation (psi 1) and no
    noise inputs patchscope knows of; `forward(z)` is the module's own, which should equal synthesis(mapping(z))."""

    @torch.no_grad()
    def measure(self) -> None:
        super().measure()
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        ws = self.net.mapping(self.sample_latents(1, 0).to(device))
        if not isinstance(ws, torch.Tensor) or ws.ndim not in (2, 3) or ws.shape[0] != 1:
            shape = list(ws.shape) if isinstance(ws, torch.Tensor) else type(ws).__name__
            raise InputError(f"{type(self.net).__name__}.mapping returned {shape} for one latent; expected "
                             f"[1, w_dim] or [1, num_ws, w_dim]")
        self.flat_w = ws.ndim == 2
        self.num_ws, self.w_dim = (1, int(ws.shape[1])) if self.flat_w else (int(ws.shape[1]), int(ws.shape[2]))

    def forward(self, z: torch.Tensor, psi: float | None = None, truncation_cutoff: int | None = None,
                noise_mode: str | None = None) -> torch.Tensor:
        _no_truncation(psi)
        return self.net(z)

    def mapping(self, z: torch.Tensor, psi: float | None = None,
                truncation_cutoff: int | None = None) -> torch.Tensor:
        _no_truncation(psi)
        ws = self.net.mapping(z)
        return ws.unsqueeze(1) if self.flat_w else ws

    def synthesis(self, ws: torch.Tensor, noise_mode: str | None = None) -> torch.Tensor:
        if self.flat_w and ws.ndim == 3:
            ws = ws[:, 0]
        return self.net.synthesis(ws)


def _no_truncation(psi: float | None) -> None:
    if psi is not None and psi != 1:
        raise InputError(f"psi {psi}: a MODULE:CALLABLE generator has no truncation (psi must be 1)")


# ----------------------------------------------------------------------------- weights

def user_state_dict(generator: Generator, discriminator: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The state dict the callable's own network has: what `--weights` loads back into a fresh one. The
    discriminator (default: the generator's) goes under `discriminator.`, where the callable's module holds it."""
    discriminator = generator.discriminator if discriminator is None else discriminator
    network = generator.net if isinstance(generator, ModuleGenerator) else generator
    state = {k: v for k, v in with_loose_buffers(network).items() if not k.startswith(DISCRIMINATOR)}
    if discriminator is not None:
        state.update({DISCRIMINATOR + k: v for k, v in with_loose_buffers(discriminator).items()})
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def load_user_weights(generator: Generator, state: dict[str, torch.Tensor], where: str) -> None:
    """Load `user_state_dict`-shaped weights strictly; a mismatch is one line naming `where`."""
    parts: list[tuple[nn.Module, dict[str, torch.Tensor]]] = []
    if isinstance(generator, ModuleGenerator):
        own = {k: v for k, v in state.items() if not k.startswith(DISCRIMINATOR)}
        theirs = {k[len(DISCRIMINATOR):]: v for k, v in state.items() if k.startswith(DISCRIMINATOR)}
        parts.append((generator.net, own))
        if generator.discriminator is not None or theirs:
            if generator.discriminator is None:
                raise InputError(f"{where}: holds discriminator weights; the module has no discriminator")
            parts.append((generator.discriminator, theirs))
    else:
        parts.append((generator, state))
    for module, weights in parts:
        try:
            load_with_loose_buffers(module, weights)
        except RuntimeError as err:
            raise InputError(f"{where}: weights do not fit the network ({one_line(err)})") from None


# ----------------------------------------------------------------------------- provenance

def parameters_sha256(generator: nn.Module) -> str:
    """Digest of every parameter and buffer that shapes the images (the discriminator excluded),
    so a resumed run can tell the same weights even without the checkpoint file."""
    digest = hashlib.sha256()
    tensors = [*generator.named_parameters(), *generator.named_buffers()]
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        if name.startswith(DISCRIMINATOR):
            continue
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{list(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def generator_sha256(spec: str | os.PathLike, generator: Generator | None = None) -> str:
    """What resumes compare: a file's SHA-256; for MODULE:CALLABLE, the SHA-256 of the spec, the module's source
    file, the --weights file and the opened network's weights together (`generator`: the one opened from it)."""
    source = module_source(generator) if generator is not None else None
    if source is None:
        if is_module_spec(spec):
            raise ValueError(f"{spec}: pass the generator opened from it")
        return checkpoint_sha256(spec)
    record = {**asdict(source), "module_file": None, "weights": None, "parameters": parameters_sha256(generator)}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def provenance(generator: Generator) -> dict[str, Any] | None:
    """Plain facts of a MODULE:CALLABLE generator's origin for metadata (None for a checkpoint file)."""
    source = module_source(generator)
    return None if source is None else asdict(source)


# ----------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _current_folder_importable() -> Iterator[None]:
    """The current folder first on sys.path while the user's module is imported and called."""
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()  # a module written after the folder was last listed
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import(spec: str, name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (err.name == name or name.startswith(err.name + ".")):
            raise InputError(f"{spec}: no such file, and no module {name!r} to import from the current folder "
                             f"or the environment") from None
        raise InputError(f"{spec}: importing {name} failed: {one_line(err)}") from None
    except Exception as err:  # the user's module body: anything it raises is one line
        raise InputError(f"{spec}: importing {name} raised {type(err).__name__}: {one_line(err)}") from None


def _attribute(spec: str, module: Any, path: str) -> Any:
    value = module
    for part in path.split("."):
        if not hasattr(value, part):
            where = getattr(module, "__file__", None) or module.__name__
            raise InputError(f"{spec}: {module.__name__} ({where}) has no attribute {path!r}")
        value = getattr(value, part)
    if not callable(value):
        raise InputError(f"{spec}: {path} is a {type(value).__name__}, not a callable")
    return value


def _call(spec: str, factory: Any) -> Any:
    # The user's initialisation draws from torch's global generator: fork it, so the caller's stream is untouched.
    try:
        with torch.random.fork_rng(devices=[]):
            return factory()
    except Exception as err:
        raise InputError(f"{spec}: calling it raised {type(err).__name__}: {one_line(err)}") from None


def _size(spec: str, net: nn.Module, names: tuple[str, ...], option: int | None, flag: str) -> int | None:
    found = next(((name, getattr(net, name)) for name in names if getattr(net, name, None) is not None), None)
    if found is not None:
        name, value = found
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{spec}: {name} = {value!r}; expected a positive integer")
        if option and option != value:
            raise InputError(f"{spec}: {flag} {option} disagrees with the module's {name} = {value}")
        return value
    return option or None


@torch.no_grad()
def _check_output(spec: str, generator: Generator) -> None:
    """One latent through the generator: images [1, 3, R, R], finite, in about [-1, 1]."""
    if not isinstance(getattr(generator, "latent_dim", None), int) or not isinstance(
            getattr(generator, "resolution", None), int):
        raise InputError(f"{spec}: the Generator has no integer latent_dim and resolution")
    device = next((p.device for p in generator.parameters()), torch.device("cpu"))
    try:
        out = generator(generator.sample_latents(1, 0).to(device))
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"{spec}: one latent [1, {generator.latent_dim}] through it raised "
                         f"{type(err).__name__}: {one_line(err)}") from None
    expected = [1, 3, generator.resolution, generator.resolution]
    if not isinstance(out, torch.Tensor) or list(out.shape) != expected:
        shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InputError(f"{spec}: returned {shape} for one latent; expected {expected} images")
    out = out.float()
    if not bool(torch.isfinite(out).all()):
        raise InputError(f"{spec}: returned non-finite values for a latent")
    largest = float(out.abs().max())
    if largest > LARGEST_VALUE:
        raise InputError(f"{spec}: returned values up to {largest:.3g}; expected images in [-1, 1] (e.g. tanh), "
                         f"not [0, 255]")
