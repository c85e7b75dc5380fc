# Session 12's src (ab_s12, fa40521) against HEAD's (src), alternated on one H200: prefill of
# 2048 tokens (3x), batch-8 decode (2x), batch-1 decode (2x).
# ab_s12: `git archive fa40521 src | tar x --strip-components=1 -C ab_s12` (untracked; carried to the device with the tree)
set -u
M="python3 -m mamba2_cli bench --preset codestral-7b --backend triton --no-kernels --json"
get() { python3 -c "import json,sys; d=json.load(sys.stdin); r=(d.get('results') or [d])[0]; print(round(r['ttft_s']*1e3,2), 'ms to first token;', round(r['decode_tok_s'],2), 'tok/s;', round(r['decode_ms_per_step'],4), 'ms/step')"; }
for i in 1 2 3; do
  for v in ab_s12 src; do
    echo "p2048 $v run $i: $(PYTHONPATH=$v timeout 100 $M --prompt-len 2048 --gen-len 8 --repeats 5 2>/dev/null | get)"
  done
done
for i in 1 2; do
  for v in ab_s12 src; do
    echo "b8 $v run $i: $(PYTHONPATH=$v timeout 100 $M --batch-size 8 --prompt-len 128 --gen-len 64 2>/dev/null | get)"
    echo "b1 $v run $i: $(PYTHONPATH=$v timeout 100 $M --prompt-len 128 --gen-len 128 --repeats 3 2>/dev/null | get)"
  done
done
