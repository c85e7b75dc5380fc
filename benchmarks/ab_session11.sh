# b1 bench (4x), session 10's src (ab_s10, 1b1c7ad) against HEAD's (src), alternated; and
# `mamba2 run --json` once each
# ab_s10: `git archive 1b1c7ad src | tar x --strip-components=1 -C ab_s10` (untracked; carried to the device with the tree)
set -u
for i in 1 2 3 4; do
  for v in ab_s10 src; do
    r=$(PYTHONPATH=$v timeout 100 python3 -m mamba2_cli bench --preset codestral-7b --backend triton --prompt-len 128 --gen-len 128 --repeats 3 --no-kernels --json 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); r=(d.get('results') or [d])[0]; print(round(r['decode_tok_s'],2), round(r['decode_ms_per_step'],4))")
    echo "b1 $v run $i: $r"
  done
done
for v in ab_s10 src; do
  r=$(echo "def quicksort(xs):" | PYTHONPATH=$v timeout 100 python3 -m mamba2_cli run --preset codestral-7b -n 128 --ignore-eos --json 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); s=d.get('stats', d); print(round(s['decode_tok_s'],2))")
  echo "run $v: $r"
done
