"""Loader for the official StyleGAN (v1) TF pickles `(G, D, Gs)`, read without TensorFlow.

Used by format detection and the sampling commands: records from `generators.io.safe_pickle`
in, a `StyleGAN` generator (with `D_basic` attached) out; nothing in the pickle is executed.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from patchscope.common.atomic import replace_atomically
from patchscope.common.errors import CheckpointError
from patchscope.generators.io.bounds import build_within
from patchscope.generators.io.safe_pickle import describe_source, load_pickle, variable_arrays
from patchscope.generators.stylegan.discriminator import DiscriminatorConfig, StyleGANDiscriminator
from patchscope.generators.stylegan.model import DEFAULT_PSI, DEFAULT_TRUNCATION_CUTOFF, StyleGAN, StyleGANConfig

# static_kwargs name -> config field, per network.
_SYNTHESIS_KWARGS = {
    "resolution": "resolution", "num_channels": "num_channels", "dlatent_size": "w_dim",
    "fmap_base": "fmap_base", "fmap_decay": "fmap_decay", "fmap_max": "fmap_max",
    "nonlinearity": "nonlinearity", "use_wscale": "use_wscale", "use_noise": "use_noise",
    "use_pixel_norm": "use_pixel_norm", "use_instance_norm": "use_instance_norm",
    "const_input_layer": "const_input_layer", "fused_scale": "fused_scale", "blur_filter": "blur_filter",
}
_MAPPING_KWARGS = {
    "latent_size": "latent_dim", "dlatent_size": "w_dim", "mapping_layers": "mapping_layers",
    "mapping_fmaps": "mapping_fmaps", "mapping_lrmul": "mapping_lrmul",
    "mapping_nonlinearity": "mapping_nonlinearity", "normalize_latents": "normalize_latents",
}
_DISCRIMINATOR_KWARGS = {
    "resolution": "resolution", "num_channels": "num_channels", "fmap_base": "fmap_base",
    "fmap_decay": "fmap_decay", "fmap_max": "fmap_max", "nonlinearity": "nonlinearity",
    "use_wscale": "use_wscale", "mbstd_group_size": "mbstd_group_size",
    "mbstd_num_features": "mbstd_num_features", "fused_scale": "fused_scale", "blur_filter": "blur_filter",
}
# Keywords that only matter for training, graph building or are handled by our own options.
_IGNORED_KWARGS = {
    "label_size", "use_styles", "dlatent_broadcast", "structure", "dtype", "randomize_noise",
    "is_template_graph", "force_clean_graph", "truncation_psi", "truncation_cutoff",
    "truncation_psi_val", "truncation_cutoff_val", "dlatent_avg_beta", "style_mixing_prob",
    "is_training", "is_validation",
}
_KNOWN_KWARGS = {*_SYNTHESIS_KWARGS, *_MAPPING_KWARGS, *_DISCRIMINATOR_KWARGS, *_IGNORED_KWARGS}
# Layouts: TF stores dense weights [in, out] and conv weights [kh, kw, in, out].
_TO_TORCH: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "plain": lambda t: t,
    "dense": lambda t: t.t(),
    "conv": lambda t: t.permute(3, 2, 0, 1),
}
_TF_SHAPE: dict[str, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    "plain": lambda s: s,
    "dense": lambda s: (s[1], s[0]),
    "conv": lambda s: (s[2], s[3], s[1], s[0]),
}
# Lower-lod RGB layers only serve progressive growing; a finished (lod 0) net never reads them.
_UNUSED = re.compile(r"^((mapping|synthesis)/)?(lod|(ToRGB|FromRGB)_lod[1-9]\d*/(weight|bias))$")

Table = list[tuple[str, str, str]]  # (TF variable name, torch state-dict key, layout)


def load_stylegan_tf(pickled: Any, *, use_gs: bool = True, psi: float = DEFAULT_PSI,
                     truncation_cutoff: int | None = DEFAULT_TRUNCATION_CUTOFF,
                     noise_mode: str = "const", source: str = "StyleGAN pickle") -> StyleGAN:
    """Build a `StyleGAN` from the unpickled `(G, D, Gs)` records (or a lone `G_style` record).

    `use_gs` picks the averaged generator Gs (what the paper sampled) over the training G;
    `psi`/`truncation_cutoff`/`noise_mode` become the generator's defaults; `source`
    names the file in errors. D_basic is attached as `.discriminator` when present.
    """
    g_record, d_record = _pick_networks(pickled, use_gs, source)
    g_state = _network_state(g_record, "G_style", source)
    components = g_state.get("components") or {}
    mapping = _network_state(components.get("mapping"), "G_mapping", source)
    synthesis = _network_state(components.get("synthesis"), "G_synthesis", source)
    top = _variables(g_state, source)
    _check_finished(top, source)
    _check_finished(_variables(synthesis, source), source)
    named = {**top,
             **{f"mapping/{k}": v for k, v in _variables(mapping, source).items()},
             **{f"synthesis/{k}": v for k, v in _variables(synthesis, source).items()}}
    kwargs = {part: dict(state.get("static_kwargs") or {})
              for part, state in (("G", g_state), ("mapping", mapping), ("synthesis", synthesis))}
    model = _build_generator(kwargs, named, f"{source} ({g_state.get('name', 'G')})", psi=psi,
                             truncation_cutoff=truncation_cutoff, noise_mode=noise_mode)
    d_state = getattr(d_record, "state", None)
    d_func = d_state.get("build_func_name") if isinstance(d_state, dict) else None
    if d_func == "D_basic":
        model.discriminator = _build_discriminator(d_record, source)
    elif d_record is not None:
        warnings.warn(f"{source}: discriminator is {d_func!r}, not D_basic; loaded the generator only")
    return model.eval()


def _within(build: Callable[[], nn.Module], variables: dict[str, np.ndarray], where: str, kind: str) -> Any:
    """The network the static_kwargs describe, refused when larger than the variables that fill it."""
    try:
        return build_within(build, variables.values(), where)
    except CheckpointError:
        raise
    except (TypeError, ValueError, OverflowError) as error:  # widths from fmap_* options out of range
        raise CheckpointError(f"{where}: unsupported {kind} options ({error})") from None


def _build_generator(kwargs: dict[str, dict[str, Any]], variables: dict[str, np.ndarray], where: str,
                     **options: Any) -> StyleGAN:
    """A `StyleGAN` from its networks' static_kwargs (G, mapping, synthesis) and TF variables by full name."""
    cfg = _generator_config({"static_kwargs": kwargs["G"]}, {"static_kwargs": kwargs["mapping"]},
                            {"static_kwargs": kwargs["synthesis"]}, where)
    model = _within(lambda: StyleGAN(cfg, **options), variables, where, "G_style")
    _assign(model, variables, _generator_table(cfg), where)
    model.tf_kwargs = kwargs  # written back by save_stylegan_tf
    return model


def load_stylegan_tf_file(path: str | os.PathLike, **opts: Any) -> StyleGAN:
    """`load_stylegan_tf` on a pickle file read with the allow-list unpickler."""
    return load_stylegan_tf(load_pickle(path), source=describe_source(path), **opts)


def _pick_networks(pickled: Any, use_gs: bool, source: str) -> tuple[Any, Any]:
    if isinstance(pickled, (tuple, list)):
        if len(pickled) != 3:
            raise CheckpointError(f"{source}: expected the official (G, D, Gs) tuple, "
                                  f"found a {len(pickled)}-element {type(pickled).__name__}")
        g, d, gs = pickled
        return (gs if use_gs else g), d
    return pickled, None


def _network_state(record: Any, build_func: str, source: str) -> dict[str, Any]:
    """The `__setstate__` dict of a tflib Network, checked to be built by `build_func`."""
    state = getattr(record, "state", None)
    if not isinstance(state, dict) or "variables" not in state:
        found = getattr(record, "qualname", type(record).__name__)
        raise CheckpointError(f"{source}: expected a StyleGAN (v1) TF network ({build_func}), found {found}")
    if state.get("build_func_name") != build_func:
        raise CheckpointError(f"{source}: expected a StyleGAN (v1) {build_func} network, "
                              f"found build function {state.get('build_func_name')!r}")
    return state


def _variables(state: dict[str, Any], source: str) -> dict[str, np.ndarray]:
    try:
        return {str(name): np.asarray(value) for name, value in state["variables"]}
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{source}: network {state.get('name')!r} has malformed variables ({error})") from error


def _check_finished(variables: dict[str, np.ndarray], source: str) -> None:
    lod = float(variables.get("lod", 0.0))
    if lod != 0.0:
        raise CheckpointError(f"{source}: network is mid progressive growing (lod {lod}); "
                              f"only finished networks (lod 0) are supported")


def _kwargs_to_config(kwargs: dict[str, Any], names: dict[str, str], source: str) -> dict[str, Any]:
    if kwargs.get("label_size", 0):
        raise CheckpointError(f"{source}: label-conditioned networks (label_size "
                              f"{kwargs['label_size']}) are not supported")
    if kwargs.get("use_styles", True) is not True:
        raise CheckpointError(f"{source}: networks built with use_styles=False are not supported")
    fields: dict[str, Any] = {}
    for key, value in kwargs.items():
        if key in names:
            if key == "blur_filter" and value is not None:
                value = tuple(float(v) for v in value)
            fields[names[key]] = value
        elif key not in _KNOWN_KWARGS:
            warnings.warn(f"{source}: ignoring unknown network option {key}={value!r}")
    return fields


def _generator_config(g: dict, mapping: dict, synthesis: dict, source: str) -> StyleGANConfig:
    shared = dict(g.get("static_kwargs") or {})
    fields = _kwargs_to_config({**shared, **(synthesis.get("static_kwargs") or {})}, _SYNTHESIS_KWARGS, source)
    fields.update(_kwargs_to_config({**shared, **(mapping.get("static_kwargs") or {})}, _MAPPING_KWARGS, source))
    try:
        return StyleGANConfig(**fields)
    except (TypeError, ValueError, OverflowError) as error:
        raise CheckpointError(f"{source}: unsupported G_style options ({error})") from error


def _generator_table(cfg: StyleGANConfig) -> Table:
    table: Table = [("dlatent_avg", "w_avg", "plain")]
    for i in range(cfg.mapping_layers):
        table += [(f"mapping/Dense{i}/weight", f"mapping_network.dense.{i}.weight", "dense"),
                  (f"mapping/Dense{i}/bias", f"mapping_network.dense.{i}.bias", "plain")]
    if cfg.const_input_layer:
        table.append(("synthesis/4x4/Const/const", "synthesis_network.const", "plain"))
    else:
        table.append(("synthesis/4x4/Dense/weight", "synthesis_network.input_dense.weight", "dense"))
    for i in range(cfg.num_layers):
        res = cfg.layer_resolution(i)
        if i < 2:
            scope = "synthesis/4x4/" + ("Conv" if i else ("Const" if cfg.const_input_layer else "Dense"))
        else:
            scope = f"synthesis/{res}x{res}/" + ("Conv0_up" if i % 2 == 0 else "Conv1")
        key = f"synthesis_network.layers.{i}"
        if i > 0:
            table.append((f"{scope}/weight", f"{key}.conv.weight", "conv"))
        if cfg.use_noise:
            table += [(f"{scope}/Noise/weight", f"{key}.noise_strength", "plain"),
                      (f"synthesis/noise{i}", f"{key}.noise_const", "plain")]
        table += [(f"{scope}/bias", f"{key}.bias", "plain"),
                  (f"{scope}/StyleMod/weight", f"{key}.style.weight", "dense"),
                  (f"{scope}/StyleMod/bias", f"{key}.style.bias", "plain")]
    table += [("synthesis/ToRGB_lod0/weight", "synthesis_network.torgb.weight", "conv"),
              ("synthesis/ToRGB_lod0/bias", "synthesis_network.torgb.bias", "plain")]
    return table


def _build_discriminator(record: Any, source: str) -> StyleGANDiscriminator:
    state = _network_state(record, "D_basic", source)
    variables = _variables(state, source)
    _check_finished(variables, source)
    return _discriminator_from(dict(state.get("static_kwargs") or {}), variables,
                               f"{source} ({state.get('name', 'D')})")


def _discriminator_from(kwargs: dict[str, Any], variables: dict[str, np.ndarray], where: str) -> StyleGANDiscriminator:
    fields = _kwargs_to_config(kwargs, _DISCRIMINATOR_KWARGS, where)
    try:
        cfg = DiscriminatorConfig(**fields)
    except (TypeError, ValueError, OverflowError) as error:
        raise CheckpointError(f"{where}: unsupported D_basic options ({error})") from error
    disc = _within(lambda: StyleGANDiscriminator(cfg), variables, where, "D_basic")
    _assign(disc, variables, _discriminator_table(cfg), where)
    disc.tf_kwargs = dict(kwargs)  # written back by save_stylegan_tf
    return disc.eval()


def _discriminator_table(cfg: DiscriminatorConfig) -> Table:
    table: Table = [("FromRGB_lod0/weight", "fromrgb.weight", "conv"),
                    ("FromRGB_lod0/bias", "fromrgb.bias", "plain")]
    for j, res_log2 in enumerate(range(cfg.resolution_log2, 2, -1)):
        res = 2 ** res_log2
        for scope, name in (("Conv0", "conv0"), ("Conv1_down", "conv1_down")):
            table += [(f"{res}x{res}/{scope}/weight", f"blocks.{j}.{name}.weight", "conv"),
                      (f"{res}x{res}/{scope}/bias", f"blocks.{j}.{name}.bias", "plain")]
    table += [("4x4/Conv/weight", "conv.weight", "conv"), ("4x4/Conv/bias", "conv.bias", "plain"),
              ("4x4/Dense0/weight", "dense0.weight", "dense"), ("4x4/Dense0/bias", "dense0.bias", "plain"),
              ("4x4/Dense1/weight", "dense1.weight", "dense"), ("4x4/Dense1/bias", "dense1.bias", "plain")]
    return table


def _assign(module: nn.Module, variables: dict[str, np.ndarray], table: Table, where: str) -> None:
    """Copy TF variables into `module` by `table`, refusing missing, misshapen or unknown ones."""
    own = module.state_dict()
    converted: dict[str, torch.Tensor] = {}
    for tf_name, key, layout in table:
        if tf_name not in variables:
            raise CheckpointError(f"{where}: variable {tf_name!r} is missing")
        value = variables[tf_name]
        expected = _TF_SHAPE[layout](tuple(own[key].shape))
        if tuple(value.shape) != expected:
            raise CheckpointError(f"{where}: variable {tf_name!r} has shape {list(value.shape)}, "
                                  f"expected {list(expected)} from the network options")
        tensor = torch.from_numpy(np.array(value, dtype=np.float32))
        converted[key] = _TO_TORCH[layout](tensor).contiguous()
    used = {tf_name for tf_name, _, _ in table}
    unknown = sorted(n for n in variables if n not in used and not _UNUSED.match(n))
    if unknown:
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise CheckpointError(f"{where}: unexpected variables for this architecture: {shown}")
    module.load_state_dict(converted, strict=True)


# patchscope's file for a TF StyleGAN it has trained further (finetuning): each network's TF variables under
# their full TF names (mapping/..., synthesis/...), in TF layout, with the static_kwargs of G, its mapping and
# synthesis components, and D — the pickle's content without its code or TF objects.
TF_TORCH_FORMAT = "patchscope_stylegan_tf"
_TO_TF: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "plain": lambda t: t,
    "dense": lambda t: t.t(),
    "conv": lambda t: t.permute(2, 3, 1, 0),
}


def _tf_variables(module: nn.Module, table: Table) -> dict[str, torch.Tensor]:
    own = module.state_dict()
    return {tf_name: _TO_TF[layout](own[key].detach().float().cpu()).contiguous().clone()
            for tf_name, key, layout in table}


def save_stylegan_tf(average: StyleGAN, path: str | os.PathLike, *, net_generator: StyleGAN,
                     discriminator: StyleGANDiscriminator) -> Path:
    """Write `average` as Gs, `net_generator` as G and `discriminator` as D (a torch file of tensors and
    plain settings, read back by `load_generator`); atomically. Networks not loaded from TF are refused."""
    state: dict[str, Any] = {"format": TF_TORCH_FORMAT, "version": 1}
    for role, network in (("G", net_generator), ("Gs", average)):
        if not hasattr(network, "tf_kwargs"):
            raise ValueError(f"{role}: only a StyleGAN loaded from TF variables can be written back as them")
        state[role] = {"variables": _tf_variables(network, _generator_table(network.cfg)),
                       "static_kwargs": network.tf_kwargs}
    if not hasattr(discriminator, "tf_kwargs"):
        raise ValueError("D: only a discriminator loaded from TF variables can be written back as them")
    state["D"] = {"variables": _tf_variables(discriminator, _discriminator_table(discriminator.cfg)),
                  "static_kwargs": discriminator.tf_kwargs}
    path = Path(path)
    replace_atomically(path, lambda file: torch.save(state, file))
    return path


def _arrays(network: Any, role: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    if not isinstance(network, dict) or not isinstance(network.get("variables"), dict) \
            or not isinstance(network.get("static_kwargs"), dict):
        raise CheckpointError(f"a {TF_TORCH_FORMAT} file lacks the network {role} (variables and static_kwargs)")
    return network["static_kwargs"], variable_arrays(network["variables"], role)


def load_stylegan_tf_torch(state: dict[str, Any], *, use_gs: bool = True, psi: float = DEFAULT_PSI,
                           truncation_cutoff: int | None = DEFAULT_TRUNCATION_CUTOFF,
                           noise_mode: str = "const") -> StyleGAN:
    """`load_stylegan_tf` for the file `save_stylegan_tf` writes."""
    role = "Gs" if use_gs else "G"
    kwargs, variables = _arrays(state.get(role), role)
    if set(kwargs) != {"G", "mapping", "synthesis"} or not all(isinstance(v, dict) for v in kwargs.values()):
        raise CheckpointError(f"network {role}: static_kwargs must map G, mapping and synthesis to their options")
    d_kwargs, d_variables = _arrays(state.get("D"), "D")
    try:
        model = _build_generator({part: dict(kwargs[part]) for part in kwargs}, variables, f"network {role}",
                                 psi=psi, truncation_cutoff=truncation_cutoff, noise_mode=noise_mode)
        model.discriminator = _discriminator_from(dict(d_kwargs), d_variables, "network D")
    except (TypeError, ValueError, KeyError, RuntimeError) as error:  # options or arrays of the wrong kind
        raise CheckpointError(f"TF StyleGAN variables or options of an unexpected kind ({error})") from error
    return model.eval()
