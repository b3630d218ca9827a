"""NVlabs stylegan2-ada-pytorch network pickles, read without running them, mapped onto our StyleGAN2.

Used by `generators.load_generator` for `.pkl` snapshots and by tests that check the key layouts;
the records come from `generators.io.safe_pickle.load_pickle`, nothing named in the pickle is imported.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from patchscope.common.errors import CheckpointError
from patchscope.generators.io.safe_pickle import PickledRecord, load_pickle
from patchscope.generators.stylegan2.layers import make_fir_kernel
from patchscope.generators.stylegan2.model import (
    MAPPING_LR_MUL, StyleGAN2Discriminator, StyleGAN2Generator, build_discriminator, build_generator,
    count_indexed_keys,
)

UP_GAIN = 4  # rosinality stores upsampling kernels times factor**2; NVlabs stores them normalised


@dataclass
class NVlabsNetwork:
    """What a persistent-object record holds: its class name, constructor kwargs and state dict."""

    class_name: str
    init_kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]


# NVlabs constructor kwargs are a few dozen values and modules nest a few levels: a pickle's memo can
# make a graph of shared lists or modules that expands to 2^40 (or loops), so both are bounded.
MAX_KWARG_VALUES = 10_000
MAX_MODULE_VISITS = 100_000
MAX_MODULE_DEPTH = 64


def _kwarg_children(value: Any) -> list[Any]:
    if isinstance(value, PickledRecord) and (value.dict_items or value.name == "EasyDict"):
        return list(value.dict_items.values())
    if isinstance(value, dict):
        return list(value.values())
    return list(value) if isinstance(value, (list, tuple)) else []


def _check_expansion(root: Any) -> None:
    """Refuse kwargs whose expansion by `_plain` (shared containers copied out) exceeds MAX_KWARG_VALUES or
    never ends; sizes are memoised per object, so the check costs the graph, not its expansion."""
    sizes: dict[int, int] = {}
    open_ids: set[int] = set()  # entered, not yet left: the current path, for cycles
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        value, leaving = stack.pop()
        if leaving:
            open_ids.discard(id(value))
            sizes[id(value)] = 1 + sum(sizes[id(child)] for child in _kwarg_children(value))
            if sizes[id(value)] > MAX_KWARG_VALUES:
                raise ValueError(f"_init_kwargs expand to more than {MAX_KWARG_VALUES} values")
        elif id(value) in open_ids:
            raise ValueError("_init_kwargs contain themselves")
        elif id(value) not in sizes:
            open_ids.add(id(value))
            stack.append((value, True))
            stack.extend((child, False) for child in _kwarg_children(value))


def _plain(value: Any) -> Any:
    """Kwargs as plain containers: `dnnlib.EasyDict` arrives as a record holding dict items.
    Call `_check_expansion` first: this copies shared containers out."""
    if isinstance(value, PickledRecord) and (value.dict_items or value.name == "EasyDict"):
        return {k: _plain(v) for k, v in value.dict_items.items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _module_dict(obj: Any) -> dict[str, Any]:
    """The `__dict__` of a pickled module: a persistent record keeps it in its meta dict."""
    if isinstance(obj, PickledRecord):
        if obj.args and isinstance(obj.args[0], dict) and "state" in obj.args[0]:
            obj = obj.args[0]["state"]
        else:
            obj = obj.state
    if not isinstance(obj, dict) or not all(k in obj for k in ("_parameters", "_buffers", "_modules")):
        raise ValueError("a module record without _parameters/_buffers/_modules")
    return obj


def _collect_state(module: dict[str, Any], prefix: str, out: dict[str, torch.Tensor],
                   path: tuple[int, ...] = (), visits: list[int] | None = None) -> None:
    # The order of nn.Module.state_dict: parameters, persistent buffers, then children.
    visits = visits if visits is not None else [0]
    visits[0] += 1
    if id(module) in path or len(path) > MAX_MODULE_DEPTH or visits[0] > MAX_MODULE_VISITS:
        raise ValueError("modules that contain themselves, nest too deeply or repeat too often")
    skipped = set(module.get("_non_persistent_buffers_set") or ())
    for name, value in module["_parameters"].items():
        if value is not None:
            out[prefix + name] = value.detach()
    for name, value in module["_buffers"].items():
        if value is not None and name not in skipped:
            out[prefix + name] = value.detach()
    for name, child in module["_modules"].items():
        if child is not None:
            _collect_state(_module_dict(child), f"{prefix}{name}.", out, (*path, id(module)), visits)


def read_network(record: Any, source: str = "checkpoint", part: str = "network") -> NVlabsNetwork:
    """Class name, `_init_kwargs` and state dict of one pickled NVlabs network, without running it."""
    try:
        meta = record.args[0] if isinstance(record, PickledRecord) and record.args else {}
        module = _module_dict(record)
        state: dict[str, torch.Tensor] = {}
        _collect_state(module, "", state)
        _check_expansion(module.get("_init_kwargs") or {})
        kwargs = _plain(module.get("_init_kwargs") or {})
        if not isinstance(kwargs, dict):
            raise ValueError("_init_kwargs is not a mapping")
        if module.get("_init_args"):
            raise ValueError("positional constructor arguments")
    except (ValueError, AttributeError, TypeError) as err:
        raise CheckpointError(f"{source}: '{part}' is not a readable NVlabs network record ({err})") from None
    name = meta.get("class_name") if isinstance(meta, dict) else None
    return NVlabsNetwork(str(name or getattr(record, "name", "?")), dict(kwargs), state)


# ---- key layouts: (NVlabs key, rosinality key, conversion, whether NVlabs -> rosinality uses it) ----

def generator_key_table(size: int, n_mlp: int) -> list[tuple[str, str, str, bool]]:
    """Every NVlabs G key in state-dict order with its rosinality counterpart.

    Rows marked False are NVlabs filter buffers with no own rosinality key; they are
    derived from a rosinality kernel (and checked to be the standard filter on import).
    """
    rows: list[tuple[str, str, str, bool]] = []

    def layer(nv: str, ros: str, noise_index: int, blur: str) -> None:
        # only an upsampling conv has a blur kernel of its own; the others borrow one
        rows.extend([(f"{nv}.weight", f"{ros}.conv.weight", "lead1", True),
                     (f"{nv}.noise_strength", f"{ros}.noise.weight", "strength", True),
                     (f"{nv}.bias", f"{ros}.activate.bias", "same", True),
                     (f"{nv}.resample_filter", blur, "filter_up", blur.startswith(f"{ros}."))])
        rows.extend([(f"{nv}.noise_const", f"noises.noise_{noise_index}", "noise", True),
                     (f"{nv}.affine.weight", f"{ros}.conv.modulation.weight", "same", True),
                     (f"{nv}.affine.bias", f"{ros}.conv.modulation.bias", "same", True)])

    def torgb(nv: str, ros: str) -> None:
        rows.extend([(f"{nv}.weight", f"{ros}.conv.weight", "lead1", True),
                     (f"{nv}.bias", f"{ros}.bias", "rgb_bias", True),
                     (f"{nv}.affine.weight", f"{ros}.conv.modulation.weight", "same", True),
                     (f"{nv}.affine.bias", f"{ros}.conv.modulation.bias", "same", True)])

    rows.append(("synthesis.b4.const", "input.input", "lead1", True))
    rows.append(("synthesis.b4.resample_filter", "convs.0.conv.blur.kernel", "filter_up", False))
    layer("synthesis.b4.conv1", "conv1", 0, "convs.0.conv.blur.kernel")
    torgb("synthesis.b4.torgb", "to_rgb1")
    for k in range(int(math.log2(size)) - 2):
        block, blur = f"synthesis.b{2 ** (k + 3)}", f"convs.{2 * k}.conv.blur.kernel"
        rows.append((f"{block}.resample_filter", f"to_rgbs.{k}.upsample.kernel", "filter_up", True))
        layer(f"{block}.conv0", f"convs.{2 * k}", 2 * k + 1, blur)
        layer(f"{block}.conv1", f"convs.{2 * k + 1}", 2 * k + 2, blur)
        torgb(f"{block}.torgb", f"to_rgbs.{k}")
    rows.append(("mapping.w_avg", "latent_avg", "same", True))
    for i in range(n_mlp):
        rows.extend([(f"mapping.fc{i}.weight", f"style.{i + 1}.weight", "same", True),
                     (f"mapping.fc{i}.bias", f"style.{i + 1}.bias", "same", True)])
    return rows


def discriminator_key_table(size: int) -> list[tuple[str, str, str, bool]]:
    """Every NVlabs D key (resnet architecture) in state-dict order with its rosinality counterpart."""
    rows: list[tuple[str, str, str, bool]] = []
    for i, log in enumerate(range(int(math.log2(size)), 2, -1), start=1):
        block, ros, kernel = f"b{2 ** log}", f"convs.{i}", f"convs.{i}.conv2.0.kernel"
        rows.append((f"{block}.resample_filter", kernel, "same", False))
        if i == 1:
            rows.extend([(f"{block}.fromrgb.weight", "convs.0.0.weight", "same", True),
                         (f"{block}.fromrgb.bias", "convs.0.1.bias", "same", True),
                         (f"{block}.fromrgb.resample_filter", kernel, "same", False)])
        rows.extend([(f"{block}.conv0.weight", f"{ros}.conv1.0.weight", "same", True),
                     (f"{block}.conv0.bias", f"{ros}.conv1.1.bias", "same", True),
                     (f"{block}.conv0.resample_filter", kernel, "same", False),
                     (f"{block}.conv1.weight", f"{ros}.conv2.1.weight", "same", True),
                     (f"{block}.conv1.bias", f"{ros}.conv2.2.bias", "same", True),
                     (f"{block}.conv1.resample_filter", kernel, "same", True),
                     (f"{block}.skip.weight", f"{ros}.skip.1.weight", "same", True),
                     (f"{block}.skip.resample_filter", f"{ros}.skip.0.kernel", "same", True)])
    rows.extend([("b4.conv.weight", "final_conv.0.weight", "same", True),
                 ("b4.conv.bias", "final_conv.1.bias", "same", True),
                 ("b4.conv.resample_filter", "convs.1.conv2.0.kernel", "same", False),
                 ("b4.fc.weight", "final_linear.0.weight", "same", True),
                 ("b4.fc.bias", "final_linear.0.bias", "same", True),
                 ("b4.out.weight", "final_linear.1.weight", "same", True),
                 ("b4.out.bias", "final_linear.1.bias", "same", True)])
    return rows


def _to_rosinality(value: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "lead1":
        return value.reshape(1, *value.shape)
    if kind == "strength":
        return value.reshape(1)
    if kind == "noise":
        return value.reshape(1, 1, *value.shape)
    if kind == "rgb_bias":
        return value.reshape(1, -1, 1, 1)
    if kind == "filter_up":
        return value * UP_GAIN
    return value


def _to_nvlabs(value: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "lead1":
        return value.reshape(value.shape[1:])
    if kind == "strength":
        return value.reshape(())
    if kind == "noise":
        return value.reshape(value.shape[2:])
    if kind == "rgb_bias":
        return value.reshape(-1)
    if kind == "filter_up":
        return value / UP_GAIN
    return value


def _generator_shape(state: Mapping[str, Any]) -> tuple[int, int]:
    log = 3
    while f"synthesis.b{2 ** log}.conv1.weight" in state:
        log += 1
    return 2 ** (log - 1), count_indexed_keys(state, "mapping.fc{}.weight")


def _discriminator_size(state: Mapping[str, Any]) -> int:
    log = 3
    while f"b{2 ** log}.conv0.weight" in state:
        log += 1
    return 2 ** (log - 1)


def _check_filters(state: Mapping[str, torch.Tensor]) -> None:
    standard = make_fir_kernel()
    for key, value in state.items():
        if key.endswith("resample_filter") and not (value.shape == standard.shape and torch.allclose(value, standard)):
            raise ValueError(f"{key} is not the [1, 3, 3, 1] filter this implementation uses")


def nvlabs_to_rosinality_generator(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                                torch.Tensor | None]:
    """An NVlabs G state dict as rosinality `g_ema` keys, plus `mapping.w_avg` (None when absent)."""
    _check_filters(state)
    size, n_mlp = _generator_shape(state)
    out: dict[str, torch.Tensor] = {}
    for nv, ros, kind, primary in generator_key_table(size, n_mlp):
        if primary and not (nv == "mapping.w_avg" and nv not in state):
            out[ros] = _to_rosinality(state[nv], kind)
    w_avg = out.pop("latent_avg", None)
    return out, w_avg


def rosinality_to_nvlabs_generator(state: Mapping[str, torch.Tensor],
                                   w_avg: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rosinality `g_ema` keys (and its `latent_avg`) as an NVlabs G state dict, in NVlabs order."""
    size = 2 ** (count_indexed_keys(state, "convs.{}.conv.weight") // 2 + 2)
    n_mlp = count_indexed_keys(state, "style.{}.weight", start=1)
    source = {**state, "latent_avg": w_avg}
    return {nv: _to_nvlabs(source[ros], kind) for nv, ros, kind, _ in generator_key_table(size, n_mlp)}


def nvlabs_to_rosinality_discriminator(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An NVlabs resnet D state dict as rosinality `d` keys."""
    _check_filters(state)
    return {ros: _to_rosinality(state[nv], kind)
            for nv, ros, kind, primary in discriminator_key_table(_discriminator_size(state)) if primary}


def rosinality_to_nvlabs_discriminator(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rosinality `d` keys as an NVlabs resnet D state dict, in NVlabs order."""
    size = 2 ** (count_indexed_keys(state, "convs.{}.conv1.0.weight", start=1) + 2)
    return {nv: _to_nvlabs(state[ros], kind) for nv, ros, kind, _ in discriminator_key_table(size)}


# ---- loading -------------------------------------------------------------------------------

def _refuse_unsupported(kwargs: Mapping[str, Any], net: str, source: str, part: str) -> None:
    """Options that would change the architecture away from what we build: one clear line each."""
    parts = [kwargs.get(k) or {} for k in ("synthesis_kwargs", "block_kwargs", "mapping_kwargs", "epilogue_kwargs")]
    if not all(isinstance(p, Mapping) for p in parts):
        raise CheckpointError(f"{source}: '{part}' has nested _init_kwargs that are not mappings")
    nested = {**kwargs, **parts[0], **parts[1], **parts[2]}
    default_arch = "skip" if net == "G" else "resnet"
    checks = [("c_dim", 0, "conditional networks"), ("img_channels", 3, "non-RGB images"),
              ("architecture", default_arch, f"a {net} architecture other than '{default_arch}'"),
              ("resample_filter", [1, 3, 3, 1], "a resampling filter other than [1, 3, 3, 1]"),
              ("activation", "lrelu", "an activation other than lrelu"),
              ("use_noise", True, "generators without noise inputs"),
              ("layer_features", None, "mapping layers narrower or wider than w_dim")]
    for name, expected, what in checks:
        value = nested.get(name, expected)
        if value != expected and not (isinstance(value, (list, tuple)) and list(value) == expected):
            raise CheckpointError(f"{source}: '{part}' has {name}={value!r}; {what} are not supported")


def _network(snapshot: Mapping[str, Any], part: str, source: str) -> NVlabsNetwork:
    net = read_network(snapshot[part], source, part)
    if any(key.startswith(("synthesis.input.", "synthesis.L0_")) for key in net.state_dict):
        raise CheckpointError(f"{source}: '{part}' is a StyleGAN3 network; only StyleGAN2 pickles are supported")
    return net


def load_nvlabs(snapshot: Mapping[str, Any], use_ema: bool = True, psi: float = 1.0,
                truncation_cutoff: int | None = None, noise_mode: str = "const",
                with_discriminator: bool = True, source: str = "checkpoint") -> StyleGAN2Generator:
    """A generator from an NVlabs snapshot dict (`G_ema`, `G`, `D` persistent records from `load_pickle`).

    Reads `_init_kwargs` and the module state out of the records, maps them onto the
    rosinality-named modules, honours `conv_clamp` (runs fp32 whatever `num_fp16_res` says) and
    attaches `D` as `.discriminator`. The kwargs are kept as `.nvlabs_kwargs`.
    """
    part = "G_ema" if use_ema else "G"
    if not isinstance(snapshot, Mapping) or not isinstance(snapshot.get(part), PickledRecord):
        found = sorted(snapshot) if isinstance(snapshot, Mapping) else type(snapshot).__name__
        raise CheckpointError(f"{source}: expected an NVlabs network pickle with '{part}', found {found}")
    net = _network(snapshot, part, source)
    _refuse_unsupported(net.init_kwargs, "G", source, part)
    synthesis = net.init_kwargs.get("synthesis_kwargs") or {}
    mapping = net.init_kwargs.get("mapping_kwargs") or {}
    try:
        g_state, w_avg = nvlabs_to_rosinality_generator(net.state_dict)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source}: '{part}' is not a StyleGAN2 generator (missing or odd {err})") from None
    gen = build_generator(g_state, source, part, w_avg=w_avg, w_avg_source="checkpoint mapping.w_avg",
                          conv_clamp=synthesis.get("conv_clamp"),
                          lr_mlp=mapping.get("lr_multiplier", MAPPING_LR_MUL), psi=psi,
                          truncation_cutoff=truncation_cutoff, noise_mode=noise_mode, format="nvlabs")
    gen.nvlabs_kwargs = net.init_kwargs
    if with_discriminator and isinstance(snapshot.get("D"), PickledRecord):
        gen.discriminator = load_nvlabs_discriminator(snapshot, source)
    return gen


def load_nvlabs_discriminator(snapshot: Mapping[str, Any], source: str = "checkpoint") -> StyleGAN2Discriminator:
    """The snapshot's `D` (resnet architecture) as a rosinality-named discriminator."""
    net = _network(snapshot, "D", source)
    _refuse_unsupported(net.init_kwargs, "D", source, "D")
    epilogue = net.init_kwargs.get("epilogue_kwargs") or {}
    if epilogue.get("mbstd_num_channels", 1) != 1:
        raise CheckpointError(f"{source}: 'D' has mbstd_num_channels={epilogue['mbstd_num_channels']}; only 1 is supported")
    group = epilogue.get("mbstd_group_size", 4)  # None: the whole batch is one group
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or not 1 <= group <= 4096):
        raise CheckpointError(f"{source}: 'D' has mbstd_group_size={group!r:.40}; expected None or 1..4096")
    try:
        d_state = nvlabs_to_rosinality_discriminator(net.state_dict)
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{source}: 'D' is not a StyleGAN2 resnet discriminator (missing or odd {err})") from None
    return build_discriminator(d_state, source, "D", conv_clamp=net.init_kwargs.get("conv_clamp"),
                               stddev_group=group)


def load_nvlabs_file(path: str | os.PathLike, **opts: Any) -> StyleGAN2Generator:
    """`load_nvlabs` on a `.pkl` read with the allow-list unpickler; errors name the file."""
    return load_nvlabs(load_pickle(path), source=str(path), **opts)
