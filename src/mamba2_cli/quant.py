"""Weight-only quantization of the projections (in_proj, out_proj, lm_head): the schemes, the
tensor arithmetic, the config record and the quantized checkpoint.

    int8  symmetric, one scale per output channel: w[n, k] ~ q[n, k] * scales[n],
          q in [-127, 127], qweight int8 [N, K], scales [N].
    int4  symmetric, one scale per group of `group_size` inputs of an output channel:
          w[n, k] ~ (u[n, k] - 8) * scales[n, k // group_size], u in [1, 15]; two to a byte
          along K (byte j of a row: u[2j] in the low nibble, u[2j+1] in the high one),
          qweight uint8 [N, K / 2], scales [N, K / group_size].

Scales are in the model dtype; each q is rounded against the scale as stored, so what a
kernel reconstructs is what the quantizer meant. Everything else of the model (embedding,
norms, conv, A_log, dt_bias, D, the fp32 state) stays as it is.

A quantized checkpoint is a safetensors file of the model's state dict (`...in_proj.qweight`,
`...in_proj.scales` in place of `...in_proj.weight`) beside a mamba_ssm-format config.json
whose `quantization` object records the scheme and each projection's group size.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import Mamba2Error

SCHEMES = ("int8", "int4")
# int4 groups: the largest of these that divides the projection's input width.
GROUP_SIZES = (128, 64, 32)
# The quantized projections, as (their name in the spec, the checkpoint name pattern).
PROJECTIONS = ("in_proj", "out_proj", "lm_head")
_PROJ_NAME = re.compile(r"^(?:backbone\.layers\.\d+\.mixer\.(in_proj|out_proj)|(lm_head))\.weight$")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantSpec:
    """A scheme and, for int4, each projection's group size (empty for int8)."""

    scheme: str
    group_size: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.scheme

    def to_dict(self) -> dict:
        d = {"scheme": self.scheme, "format_version": FORMAT_VERSION}
        if self.group_size:
            d["group_size"] = dict(self.group_size)
        return d

    def group_for(self, proj: str) -> int:
        return self.group_size.get(proj, 0)


def check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise Mamba2Error(f"unknown quantization {scheme!r}; choose one of: {', '.join(SCHEMES)}")
    return scheme


def input_widths(cfg) -> dict:
    """Each quantized projection's input width K."""
    return {"in_proj": cfg.d_model, "out_proj": cfg.d_inner, "lm_head": cfg.d_model}


def group_size_for(K: int) -> int:
    """The largest of GROUP_SIZES that divides K."""
    for g in GROUP_SIZES:
        if K % g == 0:
            return g
    raise Mamba2Error(f"int4: no group size of {', '.join(map(str, GROUP_SIZES))} divides the input width {K}")


def spec_for(cfg, scheme: str) -> QuantSpec:
    """The spec that quantizing a model of this config with `scheme` uses."""
    check_scheme(scheme)
    if scheme == "int8":
        return QuantSpec("int8")
    return QuantSpec("int4", {p: group_size_for(K) for p, K in input_widths(cfg).items()})


def spec_from_dict(d, cfg, where: str) -> QuantSpec:
    """A config.json `quantization` object as a checked spec (one-line errors naming the file)."""
    if not isinstance(d, dict):
        raise Mamba2Error(f"{where}: quantization must be an object, got {d!r}")
    scheme = d.get("scheme")
    if scheme not in SCHEMES:
        raise Mamba2Error(f"{where}: quantization scheme {scheme!r} is not one this build knows "
                          f"({', '.join(SCHEMES)}); a newer mamba2 may read it")
    if scheme == "int8":
        return QuantSpec("int8")
    groups = d.get("group_size")
    if not isinstance(groups, dict) or set(groups) != set(PROJECTIONS):
        raise Mamba2Error(f"{where}: int4 quantization needs group_size for each of {', '.join(PROJECTIONS)}")
    for proj, K in input_widths(cfg).items():
        g = groups[proj]
        if not isinstance(g, int) or isinstance(g, bool) or g <= 0 or g % 2:
            raise Mamba2Error(f"{where}: group_size of {proj} must be a positive even integer, got {g!r}")
        if K % g:
            raise Mamba2Error(f"{where}: group_size {g} of {proj} does not divide its input width {K}")
    return QuantSpec("int4", dict(groups))


def read_spec(model_dir: Path, cfg) -> QuantSpec | None:
    """The quantization a checkpoint directory's config.json records, or None."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None  # read_config has already reported an unreadable config
    if not isinstance(d, dict) or "quantization" not in d:
        return None
    return spec_from_dict(d["quantization"], cfg, str(path))


# ---------------------------------------------------------------------------------------
# Tensor arithmetic


@torch.no_grad()
def quantize_int8(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (qweight int8 [N, K], scales [N] in dtype)."""
    wf = w.float()
    scales = (wf.abs().amax(dim=1) / 127.0).to(dtype)
    s = scales.float().clamp_min(torch.finfo(torch.float32).tiny)[:, None]
    q = torch.round(wf / s).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.contiguous()


@torch.no_grad()
def quantize_int4(w: torch.Tensor, group_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (qweight uint8 [N, K/2], scales [N, K/group_size] in dtype)."""
    N, K = w.shape
    if K % group_size or group_size % 2:
        raise Mamba2Error(f"int4: group size {group_size} does not divide the input width {K}")
    wf = w.float().reshape(N, K // group_size, group_size)
    scales = (wf.abs().amax(dim=2) / 7.0).to(dtype)
    s = scales.float().clamp_min(torch.finfo(torch.float32).tiny)[:, :, None]
    u = (torch.round(wf / s).clamp_(-8, 7) + 8).to(torch.uint8).reshape(N, K)
    packed = u[:, 0::2] | (u[:, 1::2] << 4)
    return packed.contiguous(), scales.contiguous()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> the signed values u - 8 as int8 [N, K]."""
    lo = (qweight & 0xF).to(torch.int8) - 8
    hi = (qweight >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(qweight.shape[0], -1)


def dequantize_int8(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (qweight.to(torch.float32) * scales.float()[:, None]).to(dtype)


def dequantize_int4(qweight: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    N = qweight.shape[0]
    groups = scales.shape[1]
    q = unpack_int4(qweight).to(torch.float32).view(N, groups, -1)
    return (q * scales.float()[:, :, None]).reshape(N, -1).to(dtype)


# ---------------------------------------------------------------------------------------
# The model


def projection_of(name: str) -> str | None:
    """'in_proj' | 'out_proj' | 'lm_head' for a quantized projection's weight name, else None."""
    m = _PROJ_NAME.match(name)
    return None if m is None else (m[1] or m[2])


def restructure(model, spec: QuantSpec) -> None:
    """Replace the projections of a meta-device model by quantized ones of `spec` (their state
    dict then names qweight and scales, the shapes a quantized checkpoint must have)."""
    from .linear import quantized_class

    cls = quantized_class(spec.scheme)
    with torch.device("meta"):
        for layer in model.backbone.layers:
            mixer = layer.mixer
            for proj in ("in_proj", "out_proj"):
                old = getattr(mixer, proj)
                setattr(mixer, proj, cls(old.in_features, old.out_features, old.bias is not None, spec.group_for(proj)))
        old = model.lm_head
        model.lm_head = cls(old.in_features, old.out_features, False, spec.group_for("lm_head"))
    model.quant = spec


def converter(spec: QuantSpec, dtype: torch.dtype):
    """The per-tensor hook of load-time quantization: (name, tensor on its device) -> what the
    quantized model stores for it. A projection's full-precision weight is dropped as soon as
    its quantized form exists, so the whole model is never held at full precision."""

    def convert(name: str, t: torch.Tensor) -> dict:
        proj = projection_of(name)
        if proj is None:
            return {name: t}
        prefix = name[: -len("weight")]
        if spec.scheme == "int8":
            q, s = quantize_int8(t, dtype)
        else:
            q, s = quantize_int4(t, spec.group_for(proj), dtype)
        return {prefix + "qweight": q, prefix + "scales": s}

    return convert


def check_loaded(model) -> None:
    """A quantized checkpoint's qweight tensors must have the scheme's integer dtype."""
    from .linear import QuantizedLinear

    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedLinear) and mod.qweight.dtype != mod.QDTYPE:
            raise Mamba2Error(f"{name}.qweight is {str(mod.qweight.dtype).removeprefix('torch.')}; "
                              f"{mod.scheme} weights are {str(mod.QDTYPE).removeprefix('torch.')}")


def weight_bytes(cfg, itemsize: int, spec: QuantSpec | None) -> int:
    """Bytes of the model's weights with its projections quantized by `spec` (None: none)."""
    total = cfg.num_parameters() * itemsize
    if spec is None:
        return total
    counts = {"in_proj": cfg.n_layer * cfg.in_proj_dim, "out_proj": cfg.n_layer * cfg.d_model,
              "lm_head": cfg.padded_vocab_size}
    for proj, K in input_widths(cfg).items():
        N = counts[proj]
        full = N * K * itemsize
        if spec.scheme == "int8":
            packed = N * K + N * itemsize
        else:
            packed = N * K // 2 + N * (K // spec.group_for(proj)) * itemsize
        # A tied lm_head is the embedding, which stays: its quantized copy comes on top.
        total += packed - (0 if proj == "lm_head" and cfg.tie_embeddings else full)
    return total


def config_dict(cfg, spec: QuantSpec) -> dict:
    """A mamba_ssm-format config.json (it carries every field of the config) with the quantization."""
    return {
        "d_model": cfg.d_model, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
        "pad_vocab_size_multiple": cfg.pad_vocab_size_multiple,
        "ssm_cfg": {"layer": "Mamba2", "d_state": cfg.d_state, "headdim": cfg.headdim, "expand": cfg.expand,
                    "d_conv": cfg.d_conv, "chunk_size": cfg.chunk_size, "ngroups": cfg.ngroups,
                    "norm_before_gate": cfg.norm_before_gate, "dt_limit": list(cfg.dt_limit), "bias": cfg.bias,
                    "conv_bias": cfg.conv_bias, "D_has_hdim": cfg.D_has_hdim},
        "norm_epsilon": cfg.layer_norm_epsilon, "residual_in_fp32": cfg.residual_in_fp32,
        "tie_embeddings": cfg.tie_embeddings, "rms_norm": True,
        "quantization": spec.to_dict(),
    }


# Files of a checkpoint directory that a quantized copy does not take over.
_WEIGHT_FILES = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.index\.json|^config\.json|^params\.json)$")


def write_checkpoint(model, model_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    """Write a loaded quantized model to `out`: model.safetensors, config.json, the tokenizer files."""
    from safetensors.torch import save_file

    if getattr(model, "quant", None) is None:
        raise Mamba2Error("write_checkpoint: the model is not quantized")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Mamba2Error(f"{out} exists and is not an empty directory")
    out.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config_dict(model.cfg, model.quant), indent=1) + "\n")
    for src in {Path(model_dir), Path(tokenizer_dir)}:
        for f in sorted(src.iterdir()):
            if f.is_file() and not _WEIGHT_FILES.search(f.name) and not (out / f.name).exists():
                shutil.copyfile(f, out / f.name)
    return out


def load_plan(model_dir: Path, cfg, requested: str | None) -> tuple[bool, QuantSpec | None]:
    """(whether the checkpoint is stored quantized, the spec the model loads with) for a
    checkpoint directory and the --quant asked for (None: as stored)."""
    stored = read_spec(model_dir, cfg)
    if requested is not None:
        check_scheme(requested)
        if stored is not None:
            again = "drop --quant" if stored.scheme == requested else "quantize the full-precision checkpoint instead"
            raise Mamba2Error(f"{model_dir} is already quantized ({stored.scheme}); {again}")
        return False, spec_for(cfg, requested)
    return stored is not None, stored


@torch.no_grad()
def quantize_model(model, scheme: str):
    """Quantize a loaded model's projections in place, one at a time; returns the model."""
    from .linear import quantized_class

    if model.quant is not None:
        raise Mamba2Error(f"the model is already quantized ({model.quant.scheme})")
    spec = spec_for(model.cfg, scheme)
    cls, dtype = quantized_class(scheme), model.dtype
    for layer in model.backbone.layers:
        mixer = layer.mixer
        for proj in ("in_proj", "out_proj"):
            old = getattr(mixer, proj)
            setattr(mixer, proj, cls.from_weight(old.weight, old.bias, spec.group_for(proj), dtype))
            del old
    model.lm_head = cls.from_weight(model.lm_head.weight, None, spec.group_for("lm_head"), dtype)
    model.quant = spec
    return model.prepare()
