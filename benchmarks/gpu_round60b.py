"""GPU round 60b (session 12): does the greedy graph's pinned token match its device token?

Round 60's first HOST_WRITE graph gave other greedy tokens than session 11's graph, while four
more graphs of the new tail (one of the same switches) gave the same. Here one graph with
HOST_WRITE on and one with it off run 300 greedy steps each; after every collect the host's
token is compared with the device buffer the next step embeds. Needs 4d7b03b (kernels/argmax.py
and Mamba2LM.decode_greedy, taken out after this round).

    PYTHONPATH=src timeout 38 python3 benchmarks/gpu_round60b.py        # H200
"""

import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import gpu_round5 as r5  # noqa: E402

g = importlib.import_module("mamba2_cli.generate")
m = r5.load_model(torch.device("cuda"), False)
for hw in (True, False):
    g.HOST_WRITE = hw
    gr = g.DecodeGraph(m, m.new_state(1), greedy=True)
    gr.launch(torch.tensor([17], device="cuda"))
    gr.collect()
    bad = 0
    for i in range(300):
        gr.launch(None)
        h = gr.collect()[0]
        bad += h != gr.tokens.item()
    print("host_write", hw, "host != device on", bad, "of 300 steps", flush=True)
