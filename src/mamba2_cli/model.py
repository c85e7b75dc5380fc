"""Mamba2LM: embeddings, pre-norm Mamba-2 blocks, final norm, lm_head.

Parameter names follow the HF layout (`backbone.embeddings.weight`,
`backbone.layers.N.mixer.in_proj.weight`, ...); checkpoint.py maps the other formats onto it.
The numerics live in the backend (kernels/); this file only wires the pieces together.
"""

from __future__ import annotations

import torch
from torch import nn

from . import timings
from .config import Mamba2Config
from .kernels import get_backend
from .linear import Linear
from .state import Mamba2State


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Mamba2Mixer(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        H = cfg.nheads
        self.in_proj = Linear(cfg.d_model, cfg.in_proj_dim, bias=cfg.bias)
        self.conv1d = nn.Conv1d(cfg.conv_dim, cfg.conv_dim, cfg.d_conv, groups=cfg.conv_dim, bias=cfg.conv_bias)
        # dt_bias, A_log and D stay fp32 whatever the model dtype (fp16 A overflows).
        self.dt_bias = nn.Parameter(torch.zeros(H, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.zeros(H, dtype=torch.float32))
        self.D = nn.Parameter(torch.ones((H, cfg.headdim) if cfg.D_has_hdim else (H,), dtype=torch.float32))
        self.norm = RMSNorm(cfg.d_inner)
        self.out_proj = Linear(cfg.d_inner, cfg.d_model, bias=cfg.bias)
        self.register_buffer("A", torch.zeros(H, dtype=torch.float32), persistent=False)

    def prepare(self) -> None:
        """Derived tensors, computed once after the weights are in place."""
        self.A = -torch.exp(self.A_log.detach().float())
        self.conv_weight = self.conv1d.weight.detach()[:, 0, :]  # [C, K] view
        with torch.no_grad():
            self.in_proj_parts = self._split_in_proj()

    def _split_in_proj(self) -> tuple[Linear, Linear]:
        """in_proj as (z's rows, the rest): z feeds only the gated norm, so where only some
        positions' outputs are kept, z is projected for those alone. A tuple, so the views
        stay out of the module tree."""
        d = self.cfg.d_inner
        return self.in_proj.rows(0, d), self.in_proj.rows(d, self.cfg.in_proj_dim)

    scan_chunk: int = 0  # block length of the prefill scan, chosen by the backend (see set_backend)

    def decode_step(self, zxbcdt: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor,
                    backend, state_settled: bool = False) -> torch.Tensor:
        """One token from in_proj's output zxbcdt [b, in_proj_dim] to out_proj's [b, d_model].
        state_settled: no kernel launched just before this token's first wrote the state
        (backend.mixer_decode_step's promise)."""
        cfg = self.cfg
        y = backend.mixer_decode_step(
            zxbcdt, self.conv_weight, self.conv1d.bias, conv_state, self.A, self.D, self.dt_bias,
            cfg.dt_limit, self.norm.weight, ssm_state, cfg.ngroups, cfg.layer_norm_epsilon,
            cfg.norm_before_gate, state_settled=state_settled,
        )
        return backend.linear(y, self.out_proj)

    def forward(self, u: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor, backend,
                seq_len: torch.Tensor | None = None, keep=None) -> torch.Tensor:
        """keep: None, the output of every position; an int k, of the last k positions; or an
        index tensor [b, k], of those positions of each row (the state advances over all)."""
        cfg = self.cfg
        b, L, _ = u.shape
        if L == 1 and seq_len is None:
            # The backend's linear, not the modules' __call__: per-token overhead adds up.
            zxbcdt = backend.linear(u[:, 0], self.in_proj)
            return self.decode_step(zxbcdt, conv_state, ssm_state, backend)[:, None]

        H, P, G, N = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
        if torch.is_grad_enabled():  # training (scripts/train_tiny.py): derived tensors stay attached
            A, conv_weight = -torch.exp(self.A_log.float()), self.conv1d.weight[:, 0, :]
            in_proj_parts = self._split_in_proj() if keep is not None else None
        else:
            A, conv_weight, in_proj_parts = self.A, self.conv_weight, self.in_proj_parts
        if keep is not None:
            # z feeds only the gated norm, which runs on the kept positions: project those alone
            # (the last layer of a prefill saves ~44 % of its in_proj).
            z_proj, xbcdt_proj = in_proj_parts
            z = backend.linear(_keep(u, keep), z_proj)
            xBCdt = backend.linear(u, xbcdt_proj)
            xBC, dt = torch.split(xBCdt, [cfg.conv_dim, H], dim=-1)
        else:
            zxbcdt = backend.linear(u, self.in_proj)
            z, xBC, dt = torch.split(zxbcdt, [cfg.d_inner, cfg.conv_dim, H], dim=-1)
        xBC = backend.causal_conv1d(xBC, conv_weight, self.conv1d.bias, conv_state, seq_len=seq_len)
        x, B, C = torch.split(xBC, [cfg.d_inner, G * N, G * N], dim=-1)
        # The scan writes the final state over the initial one, in place.
        y, _ = backend.ssd_prefill(
            x.reshape(b, L, H, P), dt, A, B.reshape(b, L, G, N), C.reshape(b, L, G, N),
            self.D, self.dt_bias, cfg.dt_limit, self.scan_chunk, initial_state=ssm_state,
            seq_len=seq_len, final_state=ssm_state,
        )
        y = y.reshape(b, L, cfg.d_inner)
        if keep is not None:  # the positions whose output is used (the norm and out_proj are per position)
            y = _keep(y, keep)
        y = backend.gated_rmsnorm(y, z, self.norm.weight, cfg.d_inner // G, cfg.layer_norm_epsilon,
                                  cfg.norm_before_gate)
        return backend.linear(y, self.out_proj)


def _keep(t: torch.Tensor, keep) -> torch.Tensor:
    """t [b, L, d] at the kept positions: the last `keep` (an int) or those of `keep` [b, k]."""
    if isinstance(keep, int):
        return t[:, -keep:]
    return t.gather(1, keep[:, :, None].expand(-1, -1, t.shape[-1]))


class Mamba2Block(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model)
        self.mixer = Mamba2Mixer(cfg)


class Mamba2Backbone(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        # Uninitialized: nn.Embedding's own normal_ init, on the meta device, imports
        # torch._dynamo (1-4 s at the first load of a process) for values never used.
        V, d = cfg.padded_vocab_size, cfg.d_model
        self.embeddings = nn.Embedding(V, d, _weight=torch.empty(V, d))
        self.layers = nn.ModuleList(Mamba2Block(cfg) for _ in range(cfg.n_layer))
        self.norm_f = RMSNorm(cfg.d_model)


class Mamba2LM(nn.Module):
    def __init__(self, cfg: Mamba2Config):
        super().__init__()
        self.cfg = cfg
        self.backbone = Mamba2Backbone(cfg)
        self.lm_head = Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        self.backend_name = None
        self.backend = None  # set_backend, once the weights are on their device
        self.cpu_threads = None  # a cpu_threads.ThreadPolicy: threads chosen per forward (CPU, no --threads)
        self.quant = None  # the projections' quantization (quant.QuantSpec), set by quant.restructure

    @property
    def device(self) -> torch.device:
        return self.backbone.embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.embeddings.weight.dtype

    def set_backend(self, name: str) -> str:
        """Select 'torch', 'triton' or 'auto' for this model's device; returns the name chosen."""
        self.backend = get_backend(name, self.device.type)
        self.backend_name = self.backend.name
        if self.backend_name == "triton" and self.device.type == "cuda":
            timings.watch_compiles()  # the statistics report the seconds spent compiling
        choose = getattr(self.backend, "scan_chunk_size", lambda q, device_type: q)
        for layer in self.backbone.layers:
            layer.mixer.scan_chunk = choose(self.cfg.chunk_size, self.device.type)
        return self.backend_name

    def prepare(self) -> "Mamba2LM":
        """Tie weights and compute derived tensors; call once the weights are loaded."""
        if self.cfg.tie_embeddings and self.quant is None:  # a quantized lm_head is a copy of its own
            self.lm_head.weight = self.backbone.embeddings.weight
        for layer in self.backbone.layers:
            layer.mixer.prepare()
        # Graphs captured before hold the addresses of the tensors just replaced: generation's runner drops them.
        self.weights_version = getattr(self, "weights_version", 0) + 1
        return self

    def new_state(self, batch_size: int = 1) -> Mamba2State:
        return Mamba2State.zeros(self.cfg, batch_size, self.device, self.dtype)

    def forward(self, input_ids: torch.Tensor, state: Mamba2State, logits_to_keep: int | None = None,
                seq_len: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids [B, L] -> fp32 (float64 for float64 models) logits [B, L or logits_to_keep, vocab]; `state` is advanced in place.

        seq_len: None, or an integer tensor [B] on the model's device: row i holds seq_len[i]
        real tokens followed by padding (any valid ids). The state advances over the real
        tokens only and the logits [B, 1, vocab] are those of each row's last real token
        (seq_len 0: the state is left as it was, the logits are meaningless). The length is
        read on the device, so one CUDA graph serves prompts of any length up to L.
        """
        cfg, be = self.cfg, self.backend
        if self.cpu_threads is not None:
            self.cpu_threads.apply(input_ids.shape[1])
        h = self.backbone.embeddings(input_ids)
        if input_ids.shape[1] == 1 and seq_len is None:
            return self._decode(h[:, 0], state)
        # Only the kept positions of the last layer's output reach the logits, so that layer's
        # gated norm and out_proj run on those alone (its scan still advances the state).
        keep = None
        if seq_len is not None:
            keep = (seq_len.long() - 1).clamp(min=0).view(-1, 1)
        elif logits_to_keep:
            keep = logits_to_keep
        residual = None
        last_layer = len(self.backbone.layers) - 1
        for i, layer in enumerate(self.backbone.layers):
            normed, residual = be.add_rmsnorm(h, residual, layer.norm.weight, cfg.layer_norm_epsilon, cfg.residual_in_fp32)
            h = layer.mixer.forward(normed, state.conv[i], state.ssm[i], be, seq_len, keep if i == last_layer else None)
        if keep is not None:
            residual = _keep(residual, keep)
        normed, _ = be.add_rmsnorm(h, residual, self.backbone.norm_f.weight, cfg.layer_norm_epsilon, cfg.residual_in_fp32)
        logits = be.linear(normed, self.lm_head)
        logits = logits[..., : cfg.vocab_size]
        return logits if logits.dtype == torch.float64 else logits.float()  # float64 models: the references

    def _decode(self, h: torch.Tensor, state: Mamba2State) -> torch.Tensor:
        """One token per sequence, h [B, d_model] embedded -> fp32 logits [B, 1, vocab].

        Each pre-norm goes with the projection after it (`norm_linear`), which a backend
        may run as one launch.
        """
        cfg, be = self.cfg, self.backend
        eps, fp32 = cfg.layer_norm_epsilon, cfg.residual_in_fp32
        residual = None
        for i, layer in enumerate(self.backbone.layers):
            mixer = layer.mixer
            zxbcdt, residual = be.norm_linear(h, residual, layer.norm.weight, eps, fp32, mixer.in_proj)
            # The embedding, launched plainly, has waited for every kernel before this token,
            # and only this layer's step writes its state: settled.
            h = mixer.decode_step(zxbcdt, state.conv[i], state.ssm[i], be, state_settled=True)
        logits, _ = be.norm_linear(h, residual, self.backbone.norm_f.weight, eps, fp32, self.lm_head)
        logits = logits[:, None, : cfg.vocab_size]
        return logits if logits.dtype == torch.float64 else logits.float()
