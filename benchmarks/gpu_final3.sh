#!/usr/bin/env bash
# The closing GPU figures of sessions 3 and 4 (H200), the commands RESULTS.md quotes; outputs in $OUT
# (stderr of each command in /tmp, printed when its JSON is unreadable; the summary in summary.txt).
#   bash benchmarks/gpu_final3.sh tests    # the GPU test files (~4 min)
#   bash benchmarks/gpu_final3.sh bench    # bench b1 (+ kernels, depth 65536), run --json, b8, prefill 2048/65536, scan small
set -uo pipefail
export PYTHONPATH=src
M="python3 -m mamba2_cli"
case "${1:-bench}" in
tests)
    python3 -m pytest -q tests/test_gemv.py tests/test_model_gpu.py tests/test_triton_gpu.py tests/test_bench_kernels.py \
        tests/test_prefill_graphs.py tests/test_builtin_model.py 2>&1 | tail -25 > "$OUT/gpu_tests.txt"
    cat "$OUT/gpu_tests.txt"
    ;;
bench)
    python3 -m pytest -q tests/test_gemv.py -k "matches_linear or pipeline" 2>&1 | tail -3 > "$OUT/gpu_tests_gemv.txt"
    cat "$OUT/gpu_tests_gemv.txt"
    $M bench --preset codestral-7b --backend triton --prompt-len 128 --gen-len 128 --repeats 5 --depth 65536 --json > "$OUT/b1.json" 2> "/tmp/b1.err"
    echo "def quicksort(xs):" | $M run --preset codestral-7b -n 128 --ignore-eos --json > "$OUT/run.json" 2> "/tmp/run.err"
    $M bench --preset codestral-7b --backend triton --batch-size 8 --prompt-len 128 --gen-len 64 --no-kernels --json > "$OUT/b8.json" 2> "/tmp/b8.err"
    $M bench --preset codestral-7b --backend triton --prompt-len 2048 --gen-len 8 --repeats 5 --no-kernels --json > "$OUT/p2048.json" 2> "/tmp/p2048.err"
    $M bench --preset codestral-7b --backend triton --prompt-len 65536 --gen-len 8 --repeats 2 --no-kernels --json > "$OUT/p65536.json" 2> "/tmp/p65536.err"
    python3 benchmarks/gpu_round8.py --skip step,model > /dev/null 2>&1; mv "$OUT/round8.txt" "$OUT/scan_small.txt" 2>/dev/null
    python3 - <<'PY' | tee "$OUT/summary.txt"
import json, os
out = os.environ["OUT"]
for f in ("b1", "run", "b8", "p2048", "p65536"):
    try:
        d = json.load(open(os.path.join(out, f + ".json")))
    except Exception as e:
        print(f, "unreadable:", e, open("/tmp/" + f + ".err").read()[-400:] if os.path.exists("/tmp/" + f + ".err") else "")
        continue
    rs = d.get("results") or [d.get("stats", d)]
    for r in rs:
        keys = ("prompt_len", "batch_size", "decode_tok_s", "decode_ms_per_step", "ttft_s", "first_call_ttft_s",
                "prefill_s", "bandwidth_share", "peak_memory_bytes")
        print(f, {k: (round(r[k], 5) if isinstance(r[k], float) else r[k]) for k in keys if k in r})
    for k in ((d.get("kernels") or {}).get("rows") or []):
        print("  kernel", {kk: (round(k[kk], 4) if isinstance(k.get(kk), float) else k.get(kk))
                           for kk in ("kernel", "case", "ms", "tflop_s", "share_of_copy", "state_share_of_copy",
                                      "one_call_ms", "one_call_state_share_of_copy", "err") if kk in k})
PY
    cat "$OUT/scan_small.txt" 2>/dev/null | grep "scan small"
    ;;
esac
