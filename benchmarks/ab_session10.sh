# b1 (3x) and b8 (1x) bench, session 9's src (ab_s9, f081252) against HEAD's (src), alternated
# ab_s9: `git archive f081252 src | tar x --strip-components=1 -C ab_s9` (untracked; carried to the device with the tree)
set -u
for i in 1 2 3; do
  for v in ab_s9 src; do
    r=$(PYTHONPATH=$v timeout 100 python3 -m mamba2_cli bench --preset codestral-7b --backend triton --prompt-len 128 --gen-len 128 --repeats 3 --no-kernels --json 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); r=(d.get('results') or [d])[0]; print(round(r['decode_tok_s'],2), round(r['decode_ms_per_step'],4))")
    echo "b1 $v run $i: $r"
  done
done
for v in ab_s9 src; do
  r=$(PYTHONPATH=$v timeout 100 python3 -m mamba2_cli bench --preset codestral-7b --backend triton --batch-size 8 --prompt-len 128 --gen-len 64 --no-kernels --json 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); r=(d.get('results') or [d])[0]; print(round(r['decode_tok_s'],2), round(r['decode_ms_per_step'],4))")
  echo "b8 $v: $r"
done
