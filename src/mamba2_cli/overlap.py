"""Prefill of a long prompt on two CUDA streams: one piece's scan beside another piece's projections.

A long prompt runs in pieces carried through the state (generate.prefill). Inside a layer the
scan is latency-bound (two programs per SM walking the chunks in order), while the projections
keep the tensor cores busy and, over a long prompt, hold the board at its power limit
(benchmarks/NOTES.md, round 12). The scan of piece j+1 at layer i needs only the state that
piece j left at layer i, so the work of a group of pieces forms a wavefront:

    main stream   norm, in_proj, conv  |  gated norm, out_proj   (piece k, layer i)
    scan stream   the scan of piece k at layer i, after its conv and the scan of piece k-1

While the scan stream runs piece k's scan, the main stream runs the other pieces' projections.
Every operation is the one `Mamba2LM.forward` runs, on the same inputs and in the same order
per state, so the results are those of the pieces one after the other.

`carveout` leaves that many SMs out of cuBLAS's matmuls (torch's experimental SM carveout)
for the scans to run on meanwhile; None leaves the setting alone.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import Mamba2Error
from .model import Mamba2LM
from .state import Mamba2State

# Pieces walked through the layers together. Two are enough for the scan stream to always have
# the next piece's scan queued while the main stream runs the other piece's projections.
DEPTH = 2


class _Streams:
    """The main (current) stream and a side stream for the scans, or none of that on a CPU."""

    def __init__(self, device: torch.device, priority: bool):
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.main = torch.cuda.current_stream(device)
            lo, hi = torch.cuda.Stream.priority_range()
            self.scan = torch.cuda.Stream(device, priority=hi if priority else 0)

    def scan_ctx(self):
        return torch.cuda.stream(self.scan) if self.cuda else contextlib.nullcontext()

    def scan_after_main(self) -> None:
        if self.cuda:
            self.scan.wait_stream(self.main)

    def mark(self):
        """An event at the scan stream's present end (None on a CPU)."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.scan)
        return ev

    def main_waits(self, ev) -> None:
        if ev is not None:
            self.main.wait_event(ev)

    def used_by_scan(self, *ts: torch.Tensor) -> None:
        if self.cuda:
            for t in ts:
                t.record_stream(self.scan)

    def used_by_main(self, *ts: torch.Tensor) -> None:
        if self.cuda:
            for t in ts:
                t.record_stream(self.main)


@contextlib.contextmanager
def _sm_carveout(n: int | None):
    if n is None or not hasattr(torch._C, "_set_sm_carveout_experimental"):
        yield
        return
    old = torch._C._get_sm_carveout_experimental()
    torch._C._set_sm_carveout_experimental(n)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(old)


@torch.inference_mode()
def prefill_overlapped(model: Mamba2LM, input_ids: torch.Tensor, state: Mamba2State, chunk_tokens: int,
                       depth: int = DEPTH, carveout: int | None = None, priority: bool = True) -> torch.Tensor:
    """Like generate.prefill without graphs: input_ids [B, L] from `state` (advanced in place);
    the fp32 logits [B, V] of the last position."""
    L = input_ids.shape[1]
    if L == 0:
        raise Mamba2Error("nothing to prefill: the prompt has no tokens")
    if chunk_tokens < 1 or depth < 1:
        raise Mamba2Error("prefill_overlapped: chunk_tokens and depth must be positive")
    input_ids = input_ids.to(model.device)
    cfg, be = model.cfg, model.backend
    eps, fp32 = cfg.layer_norm_epsilon, cfg.residual_in_fp32
    H, P, G, N = cfg.nheads, cfg.headdim, cfg.ngroups, cfg.d_state
    layers = model.backbone.layers
    st = _Streams(model.device, priority)
    starts = list(range(0, L, chunk_tokens))
    # A last piece of one token goes through the model's decode path, as generate.prefill runs it.
    tail = starts.pop() if L - starts[-1] == 1 else None
    h = residual = None

    def part1(i, hk, rk):
        """Norm, in_proj and conv of layer i: (residual, z, x, B, C, dt, the tensors behind them)."""
        layer = layers[i]
        mixer = layer.mixer
        normed, rk = be.add_rmsnorm(hk, rk, layer.norm.weight, eps, fp32)
        zxbcdt = be.linear(normed, mixer.in_proj.weight, mixer.in_proj.bias)
        z, xBC, dt = torch.split(zxbcdt, [cfg.d_inner, cfg.conv_dim, H], dim=-1)
        xBC = be.causal_conv1d(xBC, mixer.conv_weight, mixer.conv1d.bias, state.conv[i])
        x, B, C = torch.split(xBC, [cfg.d_inner, G * N, G * N], dim=-1)
        return rk, (z, x, B, C, dt, zxbcdt, xBC)

    def scan(i, parts):
        z, x, B, C, dt, zxbcdt, xBC = parts
        mixer = layers[i].mixer
        b, Lp = x.shape[:2]
        st.scan_after_main()
        with st.scan_ctx():
            st.used_by_scan(zxbcdt, xBC)
            y, _ = be.ssd_prefill(
                x.reshape(b, Lp, H, P), dt, mixer.A, B.reshape(b, Lp, G, N), C.reshape(b, Lp, G, N),
                mixer.D, mixer.dt_bias, cfg.dt_limit, mixer.scan_chunk, initial_state=state.ssm[i],
                final_state=state.ssm[i],
            )
            st.used_by_main(y)
            return y, st.mark()

    def part2(i, y, ev, parts):
        z = parts[0]
        mixer = layers[i].mixer
        st.main_waits(ev)
        b, Lp = z.shape[:2]
        y = be.gated_rmsnorm(y.reshape(b, Lp, cfg.d_inner), z, mixer.norm.weight, cfg.d_inner // G, eps,
                             cfg.norm_before_gate)
        return be.linear(y, mixer.out_proj.weight, mixer.out_proj.bias)

    with _sm_carveout(carveout):
        for g0 in range(0, len(starts), depth):
            group = [input_ids[:, s : s + chunk_tokens] for s in starts[g0 : g0 + depth]]
            hs = [model.backbone.embeddings(p) for p in group]
            rs: list = [None] * len(group)
            parts: list = [None] * len(group)
            pending: list = [None] * len(group)
            for k in range(len(group)):
                rs[k], parts[k] = part1(0, hs[k], rs[k])
                pending[k] = scan(0, parts[k])
            for i in range(len(layers)):
                for k in range(len(group)):
                    y, ev = pending[k]
                    hs[k] = part2(i, y, ev, parts[k])
                    pending[k] = None
                    if i + 1 < len(layers):
                        rs[k], parts[k] = part1(i + 1, hs[k], rs[k])
                        pending[k] = scan(i + 1, parts[k])
            h, residual = hs[-1][:, -1:], rs[-1][:, -1:]
    if tail is not None:
        return model(input_ids[:, tail:], state, logits_to_keep=1)[:, -1]
    normed, _ = be.add_rmsnorm(h, residual, model.backbone.norm_f.weight, eps, fp32)
    logits = be.linear(normed, model.lm_head.weight)[..., : cfg.vocab_size]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return logits[:, -1]
