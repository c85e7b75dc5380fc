"""Find which kernel faults on a short prefill (run with CUDA_LAUNCH_BLOCKING=1)."""
import torch
from mamba2_cli import load_preset, stream_generate
from mamba2_cli.generate import prefill

model, tok = load_preset("codestral-7b", "cuda", "bfloat16", "triton")
for L in (300, 64, 1):
    ids = torch.randint(3, 32768, (1, L), device="cuda")
    for keep in (None, 1):
        st = model.new_state(1)
        try:
            with torch.inference_mode():
                out = model(ids, st, logits_to_keep=keep)
            torch.cuda.synchronize()
            print("ok", L, keep, out.shape, flush=True)
        except Exception as e:
            print("FAIL", L, keep, repr(e)[:300], flush=True)
            raise
