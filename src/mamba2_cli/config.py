"""Mamba2Config: one dataclass for the three checkpoint formats Mamba-2 models ship in.

- HF (`config.json` with `model_type: mamba2`), as written by transformers' converters.
- mamba_ssm (`config.json` with `d_model`, `n_layer`, `ssm_cfg`), state-spaces/mamba2-*.
- Mistral (`params.json`), Mamba-Codestral's consolidated release.

Keys a format leaves out take mamba_ssm's Mamba-2 defaults (d_state 128, not Mamba-1's 16).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import Mamba2Error

INF = float("inf")


class ConfigFieldError(Mamba2Error):
    """A config field of the wrong type or out of range; the readers name the file's own key."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"config: {field} {problem}")
        self.field, self.problem = field, problem


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Mamba2Config:
    d_model: int
    n_layer: int
    vocab_size: int  # real vocabulary: logits are sliced to this
    pad_vocab_size_multiple: int = 1
    d_state: int = 128
    headdim: int = 64
    expand: int = 2
    d_conv: int = 4
    chunk_size: int = 256
    ngroups: int = 1
    norm_before_gate: bool = False
    dt_limit: tuple[float, float] = (0.0, INF)
    layer_norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    bias: bool = False  # in_proj / out_proj bias
    conv_bias: bool = True
    D_has_hdim: bool = False
    format: str = "hf"  # which file format it was read from: hf | mamba_ssm | mistral

    def __post_init__(self):
        # Every field's type and range first: the sizes below divide by some of them.
        for name in POSITIVE_INTS:
            v = getattr(self, name)
            if not _is_int(v) or v <= 0:
                raise ConfigFieldError(name, f"must be a positive integer, got {v!r}")
        for name in BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigFieldError(name, f"must be true or false, got {getattr(self, name)!r}")
        eps = self.layer_norm_epsilon
        if not _is_number(eps) or not 0 < eps < INF:
            raise ConfigFieldError("layer_norm_epsilon", f"must be a positive number, got {eps!r}")
        self.layer_norm_epsilon = float(eps)
        lo, hi = self.dt_limit = _limit(self.dt_limit)
        if not 0 <= lo <= hi:
            raise ConfigFieldError("dt_limit", f"must be [low, high] with 0 <= low <= high, got [{lo}, {hi}]")
        if self.d_inner % self.headdim:
            raise ConfigFieldError(
                "headdim", f"{self.headdim} does not divide d_inner {self.d_inner} "
                f"(expand {self.expand} x d_model {self.d_model})")
        if self.nheads % self.ngroups:
            raise ConfigFieldError("ngroups", f"{self.ngroups} does not divide the {self.nheads} heads")

    # Derived sizes, named as in the mixer.
    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def in_proj_dim(self) -> int:
        return 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return math.ceil(self.vocab_size / m) * m

    def num_parameters(self) -> int:
        per_layer = (
            self.d_model  # block norm
            + self.d_model * self.in_proj_dim + (self.in_proj_dim if self.bias else 0)
            + self.conv_dim * self.d_conv + (self.conv_dim if self.conv_bias else 0)
            + 3 * self.nheads + (self.nheads * (self.headdim - 1) if self.D_has_hdim else 0)
            + self.d_inner  # gated norm
            + self.d_inner * self.d_model + (self.d_model if self.bias else 0)
        )
        emb = self.padded_vocab_size * self.d_model
        return self.n_layer * per_layer + emb * (1 if self.tie_embeddings else 2) + self.d_model

    def state_bytes(self, batch_size: int, dtype_bytes: int) -> int:
        """Bytes of recurrent state: conv window in the model dtype, SSM state in fp32."""
        conv = self.conv_dim * (self.d_conv - 1) * dtype_bytes
        ssm = self.nheads * self.headdim * self.d_state * 4
        return batch_size * self.n_layer * (conv + ssm)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dt_limit"] = list(self.dt_limit)
        return d


POSITIVE_INTS = ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_state", "headdim", "expand",
                 "d_conv", "chunk_size", "ngroups")
BOOLS = ("norm_before_gate", "residual_in_fp32", "tie_embeddings", "bias", "conv_bias", "D_has_hdim")


# Random-weight shapes for `bench --preset` and for the stand-in model of `run`.
PRESETS: dict[str, dict] = {
    "tiny": dict(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=16),
    "mamba2-130m": dict(d_model=768, n_layer=24, vocab_size=50277, pad_vocab_size_multiple=16),
    "mamba2-370m": dict(d_model=1024, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=16),
    "mamba2-780m": dict(d_model=1536, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=16),
    "mamba2-1.3b": dict(d_model=2048, n_layer=48, vocab_size=50277, pad_vocab_size_multiple=16),
    "mamba2-2.7b": dict(d_model=2560, n_layer=64, vocab_size=50277, pad_vocab_size_multiple=16),
    "codestral-7b": dict(d_model=4096, n_layer=64, vocab_size=32768, ngroups=8, tie_embeddings=False),
}


def preset_config(name: str) -> Mamba2Config:
    if name not in PRESETS:
        from .hub import ALIASES

        real = f" ({name!r} is a real checkpoint: -m {name})" if name.lower() in ALIASES else ""
        raise Mamba2Error(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}{real}")
    return Mamba2Config(**PRESETS[name])


# ---------------------------------------------------------------------------------------
# Readers


def _read_json(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise Mamba2Error(f"cannot read {path}: {e.strerror or e}") from None
    try:
        # Python's json accepts the bare `Infinity` some converters write.
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise Mamba2Error(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise Mamba2Error(f"{path} is not a config: its JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise Mamba2Error(f"{path} does not hold a JSON object")
    return data


def _float(v) -> float:
    # time_step_limit entries can be numbers, bare Infinity, or {"__float__": "Infinity"}.
    if isinstance(v, dict) and "__float__" in v:
        v = v["__float__"]
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
    if not _is_number(v) or v != v:  # NaN
        raise ConfigFieldError("dt_limit", f"holds {v!r}, not a number")
    return float(v)


def _limit(v) -> tuple[float, float]:
    if v is None:
        return (0.0, INF)
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ConfigFieldError("dt_limit", f"must be a pair [low, high], got {v!r}")
    return (_float(v[0]), _float(v[1]))


REQUIRED = object()


def _from_keys(d: dict, where: str, keys: dict[str, tuple[str, object]], **fixed) -> Mamba2Config:
    """A Mamba2Config from `keys` (field: (key in the file, default or REQUIRED)); a dotted key
    reads a nested object. A bad value is reported under the file's own key, naming the file."""
    fields = {}
    for field, (key, default) in keys.items():
        *parents, leaf = key.split(".")
        obj = d
        for parent in parents:  # the reader has checked that each is an object
            obj = obj.get(parent) or {}
        if leaf in obj:
            fields[field] = obj[leaf]
        elif default is REQUIRED:
            raise Mamba2Error(f"{where}: missing key {key!r}")
        else:
            fields[field] = default
    try:
        return Mamba2Config(**fields, **fixed)
    except ConfigFieldError as e:
        raise Mamba2Error(f"{where}: {keys[e.field][0] if e.field in keys else e.field} {e.problem}") from None


def _refuse_layernorm(d: dict, where: str) -> None:
    rms = d.get("rms_norm", True)
    if not isinstance(rms, bool):
        raise Mamba2Error(f"{where}: rms_norm must be true or false, got {rms!r}")
    if not rms:
        raise Mamba2Error(f"{where}: LayerNorm (rms_norm false) models are not supported")


HF_KEYS = {
    "d_model": ("hidden_size", REQUIRED), "n_layer": ("num_hidden_layers", REQUIRED),
    "vocab_size": ("vocab_size", REQUIRED), "d_state": ("state_size", 128), "headdim": ("head_dim", 64),
    "expand": ("expand", 2), "d_conv": ("conv_kernel", 4), "chunk_size": ("chunk_size", 256),
    "ngroups": ("n_groups", 1), "dt_limit": ("time_step_limit", None),
    "layer_norm_epsilon": ("layer_norm_epsilon", 1e-5), "residual_in_fp32": ("residual_in_fp32", True),
    "tie_embeddings": ("tie_word_embeddings", False), "bias": ("use_bias", False),
    "conv_bias": ("use_conv_bias", True),
}


def config_from_hf(d: dict, where: str = "config.json") -> Mamba2Config:
    mt = d.get("model_type")
    if mt != "mamba2":
        if mt in ("mamba", "falcon_mamba"):
            raise Mamba2Error(f"{where}: model_type {mt!r} is Mamba-1; only Mamba-2 models are supported")
        raise Mamba2Error(f"{where}: model_type {mt!r} is not a Mamba-2 language model")
    _refuse_layernorm(d, where)
    # HF's own code ignores `norm_before_gate`, and Codestral's config says true while its
    # weights need false: every HF-format checkpoint is norm-after-gate.
    cfg = _from_keys(d, where, HF_KEYS, norm_before_gate=False, format="hf")
    nh = d.get("num_heads")
    if nh is not None and nh != cfg.nheads:
        raise Mamba2Error(
            f"{where}: num_heads {nh!r} disagrees with expand*hidden_size/head_dim = {cfg.nheads}"
        )
    return cfg


def _refuse_hybrid(d: dict, where: str) -> None:
    if d.get("attn_layer_idx"):
        raise Mamba2Error(f"{where}: hybrid checkpoints (attention layers {d['attn_layer_idx']}) are not supported")
    if d.get("d_intermediate", 0):
        raise Mamba2Error(f"{where}: checkpoints with MLP blocks (d_intermediate > 0) are not supported")


MAMBA_SSM_KEYS = {
    "d_model": ("d_model", REQUIRED), "n_layer": ("n_layer", REQUIRED), "vocab_size": ("vocab_size", REQUIRED),
    "pad_vocab_size_multiple": ("pad_vocab_size_multiple", 8), "d_state": ("ssm_cfg.d_state", 128),
    "headdim": ("ssm_cfg.headdim", 64), "expand": ("ssm_cfg.expand", 2), "d_conv": ("ssm_cfg.d_conv", 4),
    "chunk_size": ("ssm_cfg.chunk_size", 256), "ngroups": ("ssm_cfg.ngroups", 1),
    "norm_before_gate": ("ssm_cfg.norm_before_gate", False), "dt_limit": ("ssm_cfg.dt_limit", None),
    "layer_norm_epsilon": ("norm_epsilon", 1e-5), "residual_in_fp32": ("residual_in_fp32", True),
    "tie_embeddings": ("tie_embeddings", True), "bias": ("ssm_cfg.bias", False),
    "conv_bias": ("ssm_cfg.conv_bias", True), "D_has_hdim": ("ssm_cfg.D_has_hdim", False),
}


def config_from_mamba_ssm(d: dict, where: str = "config.json") -> Mamba2Config:
    _refuse_hybrid(d, where)
    ssm = d.get("ssm_cfg") or {}
    if not isinstance(ssm, dict):
        raise Mamba2Error(f"{where}: ssm_cfg must be an object, got {ssm!r}")
    if ssm.get("layer", "Mamba1") != "Mamba2":
        raise Mamba2Error(f"{where}: ssm_cfg.layer is {ssm.get('layer', 'Mamba1 (default)')!r}; only Mamba-2 models are supported")
    _refuse_layernorm(d, where)
    return _from_keys(d, where, MAMBA_SSM_KEYS, format="mamba_ssm")


MISTRAL_KEYS = {
    "d_model": ("dim", REQUIRED), "n_layer": ("n_layers", REQUIRED), "vocab_size": ("vocab_size", REQUIRED),
    "pad_vocab_size_multiple": ("pad_vocab_size_multiple", 1), "d_state": ("d_state", 128),
    "headdim": ("headdim", 64), "expand": ("expand", 2), "d_conv": ("d_conv", 4),
    "chunk_size": ("chunk_size", 256), "ngroups": ("n_groups", 1),
    "norm_before_gate": ("norm_before_gate", False), "dt_limit": ("dt_limit", None),
    "residual_in_fp32": ("residual_in_fp32", True), "tie_embeddings": ("tie_embeddings", False),
}


def config_from_mistral(d: dict, where: str = "params.json") -> Mamba2Config:
    _refuse_hybrid(d, where)
    _refuse_layernorm(d, where)
    eps_key = "norm_eps" if "norm_eps" in d else "layer_norm_epsilon"
    return _from_keys(d, where, {**MISTRAL_KEYS, "layer_norm_epsilon": (eps_key, 1e-5)}, format="mistral")


def read_config(model_dir: Path) -> Mamba2Config:
    """Read the config of a checkpoint directory, whatever its format."""
    model_dir = Path(model_dir)
    cfg_path, params_path = model_dir / "config.json", model_dir / "params.json"
    if cfg_path.is_file():
        d = _read_json(cfg_path)
        if "model_type" in d and "d_model" not in d:
            return config_from_hf(d, str(cfg_path))
        if "d_model" in d or "ssm_cfg" in d:
            return config_from_mamba_ssm(d, str(cfg_path))
        raise Mamba2Error(f"{cfg_path}: neither an HF Mamba-2 config (model_type) nor a mamba_ssm config (d_model)")
    if params_path.is_file():
        return config_from_mistral(_read_json(params_path), str(params_path))
    raise Mamba2Error(f"{model_dir}: no config.json or params.json; is this a model directory?")


# generation_config.json's sampling keys, under the names mamba2's sampling settings use.
_SAMPLING_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                  "repetition_penalty": "repetition_penalty"}


def generation_defaults(model_dir: Path) -> dict:
    """The sampling defaults a model's generation_config.json gives, read as transformers reads them.

    With `do_sample` true, its temperature (1.0 when absent), top_p, top_k and min_p; without
    it generation is greedy (temperature 0). repetition_penalty applies either way. Keys the
    file leaves out are left out here too. A value of the wrong type is a one-line error.
    """
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    d = _read_json(path)
    out = {}
    for key, name in _SAMPLING_KEYS.items():
        v = d.get(key)
        if v is None:
            continue
        if not _is_number(v) or (key == "top_k" and not _is_int(v)):
            raise Mamba2Error(f"{path}: {key} holds {v!r}, not a{'n integer' if key == 'top_k' else ' number'}")
        out[name] = v
    if d.get("do_sample") is True:
        out.setdefault("temperature", 1.0)
    else:  # greedy: only the penalty applies
        out = {k: v for k, v in out.items() if k == "repetition_penalty"}
    return out
