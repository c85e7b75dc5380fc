"""State files: a saved state continues exactly, belongs to one model and dtype, and survives crashes."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import tiny_shape
from mamba2_cli import Mamba2Error, generate, load_model
from mamba2_cli.generation import prefill
from mamba2_cli.statefile import StateRun, load_state, model_fingerprint, save_state

# Texts whose tokens split cleanly at the join: tokens(A) + tokens(B) == tokens(A + B).
A = "def fibonacci(n):"
B = "\n    a, b = 0, 1\n    for _ in range(n):"


@pytest.fixture
def tiny(make_checkpoint):
    d, _, _ = make_checkpoint("hf")
    model, tok = load_model(str(d), device="cpu", dtype="float32")
    return model, tok, d


def saved_after(model, tok, ids, path):
    """Save the state that stands for `ids` (all consumed but the last)."""
    state = model.new_state(1)
    if len(ids) > 1:
        prefill(model, torch.tensor([ids[:-1]]), state)
    save_state(path, model, state, len(ids), ids[-1])
    return path


def test_saved_state_fed_more_tokens_equals_feeding_everything_at_once(tiny, tmp_path):
    model, tok, _ = tiny
    a, b = tok.encode(A), tok.encode(B, add_bos=False)
    whole = prefill(model, torch.tensor([a + b]), model.new_state(1))
    saved = load_state(saved_after(model, tok, a, tmp_path / "a.state"), model)
    assert saved.tokens == len(a) and saved.last_token == a[-1]
    resumed = prefill(model, torch.tensor([[saved.last_token] + b]), saved.state)
    torch.testing.assert_close(resumed, whole, rtol=1e-5, atol=1e-5)
    # ... and so do the greedy tokens that follow, through the generation loop
    again = load_state(tmp_path / "a.state", model)
    cont = generate(model, tok, b, max_tokens=15, state=again.state, last_token=again.last_token)
    assert cont.token_ids == generate(model, tok, a + b, max_tokens=15).token_ids


def test_state_saved_after_generation_continues_the_text(tiny, tmp_path):
    model, tok, _ = tiny
    state = model.new_state(1)
    first = generate(model, tok, A, max_tokens=10, ignore_eos=True, state=state)
    a = tok.encode(A)
    save_state(tmp_path / "g.state", model, state, len(a) + 10, first.token_ids[-1])
    saved = load_state(tmp_path / "g.state", model)
    rest = generate(model, tok, None, max_tokens=10, ignore_eos=True, state=saved.state, last_token=saved.last_token)
    assert first.token_ids + rest.token_ids == generate(model, tok, A, max_tokens=20, ignore_eos=True).token_ids


def test_a_state_file_is_a_plain_safetensors_file(tiny, tmp_path):
    from safetensors import safe_open

    model, tok, _ = tiny
    path = saved_after(model, tok, tok.encode(A), tmp_path / "s.state")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert set(f.keys()) == {"conv", "ssm"}
        assert f.get_tensor("ssm").dtype == torch.float32
        assert list(f.get_tensor("conv").shape) == [2, 1, model.cfg.conv_dim, 3]
    assert meta["tokens"] == str(len(tok.encode(A))) and meta["dtype"] == "float32"
    assert meta["model_fingerprint"] == model_fingerprint(model) and meta["mamba2_version"]


def test_fingerprint_tells_apart_same_config_other_weights(make_checkpoint, tmp_path):
    d1, _, _ = make_checkpoint("hf", seed=1)
    d2, _, sd = make_checkpoint("hf", seed=2)
    m1, tok = load_model(str(d1), device="cpu", dtype="float32")
    m2, _ = load_model(str(d2), device="cpu", dtype="float32")
    assert m1.cfg == m2.cfg and model_fingerprint(m1) != model_fingerprint(m2)
    path = saved_after(m1, tok, tok.encode(A), tmp_path / "s.state")
    with pytest.raises(Mamba2Error, match="another model.*same config, different weights"):
        load_state(path, m2)
    # one weight changed a little, anywhere in a tensor, is another model too
    sd = {k: v.clone() for k, v in sd.items()}
    sd["backbone.layers.1.mixer.out_proj.weight"] += 1e-3
    d3, _, _ = make_checkpoint("hf", sd=sd)
    m3, _ = load_model(str(d3), device="cpu", dtype="float32")
    assert model_fingerprint(m3) != model_fingerprint(m2)


def test_fingerprint_ignores_checkpoint_format_and_memory_layout(make_checkpoint):
    shape = tiny_shape(pad_vocab_size_multiple=1)
    d1, _, sd = make_checkpoint("hf", shape=shape, seed=4)
    d2, _, _ = make_checkpoint("mistral", shape=shape, sd=sd)
    m1, _ = load_model(str(d1), device="cpu", dtype="float32")
    m2, _ = load_model(str(d2), device="cpu", dtype="float32")
    fp = model_fingerprint(m1)
    assert model_fingerprint(m2) == fp
    w = m1.lm_head.weight
    m1.lm_head.weight = torch.nn.Parameter(w.detach().contiguous(), requires_grad=False)  # other strides
    assert model_fingerprint(m1) == fp


def test_a_state_of_another_shape_or_dtype_is_refused(make_checkpoint, tiny, tmp_path):
    model, tok, d = tiny
    path = saved_after(model, tok, tok.encode(A), tmp_path / "s.state")
    bf16, _ = load_model(str(d), device="cpu", dtype="bfloat16")
    with pytest.raises(Mamba2Error, match="float32 model.*--dtype float32"):
        load_state(path, bf16)
    d2, _, _ = make_checkpoint("hf", shape=tiny_shape(n_layer=3))
    other, _ = load_model(str(d2), device="cpu", dtype="float32")
    with pytest.raises(Mamba2Error, match="another model.*n_layer 2 vs 3"):
        load_state(path, other)


@pytest.mark.parametrize("damage, words", [
    ("truncated-data", "truncated"),
    ("truncated-header", "not a mamba2 state file"),
    ("flipped-byte", "damaged .checksum"),
    ("garbage", "not a mamba2 state file"),
    ("empty", "not a mamba2 state file"),
    ("plain-safetensors", "without mamba2 state metadata"),
    ("bad-metadata", "damaged"),
])
def test_damaged_state_files_are_clear_errors(tiny, tmp_path, damage, words):
    model, tok, _ = tiny
    path = saved_after(model, tok, tok.encode(A), tmp_path / "s.state")
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    if damage == "truncated-data":
        path.write_bytes(data[: len(data) - 100])
    elif damage == "truncated-header":
        path.write_bytes(data[:50])
    elif damage == "flipped-byte":
        i = 8 + header_len + (len(data) - 8 - header_len) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:])
    elif damage == "garbage":
        path.write_bytes(os.urandom(4096))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "plain-safetensors":
        from safetensors.torch import save_file

        save_file({"x": torch.zeros(3)}, str(path))
    elif damage == "bad-metadata":
        head = json.loads(data[8 : 8 + header_len])
        head["__metadata__"]["tokens"] = "many"
        raw = json.dumps(head).encode()
        raw += b" " * (-len(raw) % 8)
        path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + header_len:])
    with pytest.raises(Mamba2Error, match=words):
        load_state(path, model)
    with pytest.raises(Mamba2Error, match="does not exist"):
        load_state(tmp_path / "nope.state", model)


def test_a_failed_write_leaves_the_old_file_intact(tiny, tmp_path, monkeypatch):
    model, tok, _ = tiny
    (tmp_path / "states").mkdir()
    path = saved_after(model, tok, tok.encode(A), tmp_path / "states" / "s.state")
    before = path.read_bytes()

    def crash(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Mamba2Error, match="cannot write state file.*No space left"):
        saved_after(model, tok, tok.encode(A + B), path)
    assert path.read_bytes() == before and os.listdir(path.parent) == ["s.state"]  # no temp file left behind
    monkeypatch.undo()
    assert load_state(path, model).tokens == len(tok.encode(A))


def test_a_writer_killed_mid_write_leaves_the_old_file_intact(tiny, tmp_path):
    model, tok, d = tiny
    path = saved_after(model, tok, tok.encode(A), tmp_path / "s.state")
    before = path.read_bytes()
    # A second process rewrites the file and is killed while its data is on the way to disk.
    script = f"""
import os, sys, time, torch
from mamba2_cli import load_model
from mamba2_cli.statefile import save_state
model, tok = load_model({str(d)!r}, device="cpu", dtype="float32")
state = model.new_state(1)
state.ssm.fill_(7.0)
def stuck(fd):
    print("writing", flush=True)
    time.sleep(60)
os.fsync = stuck
save_state({str(path)!r}, model, state, 99, 5)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout.readline() == b"writing\n"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert path.read_bytes() == before
    assert load_state(path, model).tokens == len(tok.encode(A))


def test_state_run_counts_the_tokens_of_what_it_saves(tiny, tmp_path):
    model, tok, _ = tiny
    a, b = tok.encode(A), tok.encode(B, add_bos=False)
    # Saved after the prompt: the state stands for the prompt, its last token unconsumed.
    first = StateRun(model, save_to=tmp_path / "p.state")
    r = generate(model, tok, A, max_tokens=5, ignore_eos=True, state=first.state, on_prompt=first.on_prompt)
    assert first.save(r, model_name="tiny") == len(a) == first.saved_tokens
    saved = load_state(tmp_path / "p.state", model)
    assert saved.tokens == len(a) and saved.last_token == a[-1]
    # Continued, then saved after the generation: loaded tokens + the new prompt + the generated ones.
    second = StateRun(model, load_from=tmp_path / "p.state", save_to=tmp_path / "g.state", save_after="generation")
    assert second.loaded.tokens == len(a) and second.last_token == a[-1] and second.load_s > 0
    r2 = generate(model, tok, B, max_tokens=4, ignore_eos=True, state=second.state, last_token=second.last_token,
                  on_prompt=second.on_prompt, keep_state=second.keeps_state)
    assert second.save(r2) == len(a) + len(b) + 4
    assert load_state(tmp_path / "g.state", model).last_token == r2.token_ids[-1]
    # No tokens to generate: saved at the prompt whatever was asked.
    assert StateRun(model, save_to=tmp_path / "z.state", save_after="generation", max_tokens=0).on_prompt is not None
    assert StateRun(model).save(r) is None and not StateRun(model).keeps_state
    with pytest.raises(Mamba2Error, match="after the prompt or the generation"):
        StateRun(model, save_to=tmp_path / "x.state", save_after="later")


# ---------------------------------------------------------------------------------------
# mamba2 run --save-state / --load-state


def mamba2(*args, input=b""):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    p = subprocess.run([sys.executable, "-m", "mamba2_cli", *args], input=input, capture_output=True, env=env,
                       timeout=120)
    return p


def run_json(*args, input=b""):
    p = mamba2("run", "--device", "cpu", "--json", *args, input=input)
    assert p.returncode == 0, p.stderr.decode()
    return json.loads(p.stdout)


def test_cli_save_state_then_load_state_continues_like_one_run(tiny, make_checkpoint, tmp_path):
    model, tok, d = tiny
    a, b = tok.encode(A), tok.encode(B, add_bos=False)
    assert tok.encode(A + B) == a + b  # the texts split cleanly at the join
    s1, s2 = tmp_path / "prompt.state", tmp_path / "gen.state"
    whole = run_json("-m", str(d), "-n", "12", "--ignore-eos", "--save-state", str(s1), A)
    assert whole["state"]["saved_tokens"] == len(a)
    # no prompt and nothing on stdin: the saved text goes on
    cont = run_json("-m", str(d), "-n", "12", "--ignore-eos", "--load-state", str(s1))
    assert cont["token_ids"] == whole["token_ids"] and cont["prompt_tokens"] == 1
    # a prompt after a saved state: as if both were one prompt
    more = run_json("-m", str(d), "-n", "12", "--ignore-eos", "--load-state", str(s1), B)
    assert more["token_ids"] == generate(model, tok, A + B, max_tokens=12, ignore_eos=True).token_ids
    # saved after the generated text: the next run continues it
    first = run_json("-m", str(d), "-n", "6", "--ignore-eos", "--save-state", str(s2), "--save-state-after",
                     "generation", A)
    rest = run_json("-m", str(d), "-n", "6", "--ignore-eos", "--load-state", str(s2))
    assert first["token_ids"] + rest["token_ids"] == whole["token_ids"]
    assert first["state"]["saved_tokens"] == len(a) + 6

    other, _, _ = make_checkpoint("hf", seed=9)
    p = mamba2("run", "-m", str(other), "--device", "cpu", "--load-state", str(s1), "x")
    err = p.stderr.decode()
    assert p.returncode == 1 and "another model" in err and "Traceback" not in err and err.count("\n") <= 2


def test_state_benchmark_runs_on_the_tiny_preset(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "bench_state.py"
    spec = importlib.util.spec_from_file_location("bench_state", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    r = bench.main(["--preset", "tiny", "--tokens", "200", "--device", "cpu", "--repeats", "1",
                    "--dir", str(tmp_path), "--json"])
    assert json.loads(capsys.readouterr().out)["tokens"] == 200
    assert r["resume_first_token_s"] > 0 and r["full_prefill_first_token_s"] > 0 and r["state_file_bytes"] > 0


# ---------------------------------------------------------------------------------------
# Hostile and concurrent use


def rewrite_header(path, edit):
    """Rewrite the header of a state file with edit(header) applied, the data unchanged."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8 : 8 + n])
    edit(head)
    raw = json.dumps(head).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n:])


def as_format_1(head):
    """What the first state format wrote: the same keys but no header checksum."""
    head["__metadata__"]["format_version"] = "1"
    head["__metadata__"].pop("header_crc32", None)


@pytest.mark.parametrize("key, value", [
    ("last_token", lambda v: str(int(v) + 1)),
    ("tokens", lambda v: str(int(v) + 1)),
    ("dtype", lambda v: "bfloat16"),
    ("model_fingerprint", lambda v: "0" * len(v)),
    ("block_bytes", lambda v: str(int(v) // 2)),
])
def test_an_edited_header_value_is_refused_by_the_checksum(tiny, tmp_path, key, value):
    model, tok, _ = tiny
    path = saved_after(model, tok, tok.encode(A), tmp_path / "s.state")

    def edit(head):
        head["__metadata__"][key] = value(head["__metadata__"][key])

    rewrite_header(path, edit)
    for verify in (True, False):
        with pytest.raises(Mamba2Error, match=r"damaged state file \(checksum mismatch in its header\)") as e:
            load_state(path, model, verify=verify)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("block_bytes", [1, 4095, 2**30 + 1, 2**40])
def test_a_block_size_outside_4_kib_to_1_gib_is_refused(tiny, tmp_path, monkeypatch, block_bytes):
    from mamba2_cli import statefile

    model, tok, _ = tiny
    monkeypatch.setattr(statefile, "BLOCK_BYTES", block_bytes)  # a file consistent in every other way
    path = saved_after(model, tok, tok.encode(A), tmp_path / "s.state")
    with pytest.raises(Mamba2Error, match=f"damaged state file \\(block size {block_bytes:,} is outside") as e:
        load_state(path, model)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key, value, words", [
    ("block_bytes", "0", "block size 0 is outside"),
    ("block_bytes", "-4096", "block size -4,096 is outside"),
    ("block_bytes", "1", "block size 1 is outside"),
    ("tokens", "-1", "inconsistent token metadata"),
    ("tokens", str(2**60), "inconsistent token metadata"),
    ("last_token", "100000", "last token 100000 is outside the vocabulary"),
    ("crc32", "00000000," * 5000, "checksum list does not match the data"),
    ("crc32", "1ffffffff", "unreadable metadata"),
    ("chat", "[", "unreadable chat metadata"),
])
def test_metadata_values_out_of_range_are_refused_before_any_data_is_read(tiny, tmp_path, monkeypatch,
                                                                          key, value, words):
    from mamba2_cli import statefile

    model, tok, _ = tiny
    path = saved_after(model, tok, tok.encode(A), tmp_path / "s.state")
    rewrite_header(path, as_format_1)
    assert load_state(path, model).tokens == len(tok.encode(A))  # files of the first format still load

    def edit(head):
        head["__metadata__"][key] = value

    rewrite_header(path, edit)

    def no_read(*args):
        raise AssertionError("tensor data read")

    monkeypatch.setattr(statefile, "_read_blocks", no_read)
    for verify in (True, False):
        with pytest.raises(Mamba2Error, match=f"damaged state file \\({words}") as e:
            load_state(path, model, verify=verify)
        assert "\n" not in str(e.value)


def filled_state(model, value):
    state = model.new_state(1)
    state.conv.fill_(value)
    state.ssm.fill_(value)
    return state


@pytest.mark.parametrize("verify", [True, False])
def test_a_file_renamed_over_the_path_during_a_load_does_not_reach_that_load(tiny, tmp_path, monkeypatch, verify):
    from mamba2_cli import statefile

    model, _, _ = tiny
    path, other = tmp_path / "s.state", tmp_path / "other.state"
    save_state(path, model, filled_state(model, 1), 2, 1)
    save_state(other, model, filled_state(model, 2), 3, 2, model_name="x" * 100)  # its data starts elsewhere
    real = statefile.check_compatible

    def replace_then_check(*args):  # a save by another process lands between the header and the data
        if other.exists():
            os.replace(other, path)
        return real(*args)

    monkeypatch.setattr(statefile, "check_compatible", replace_then_check)
    s = load_state(path, model, verify=verify)
    assert (s.last_token, s.tokens) == (1, 2) and bool((s.state.conv == 1).all()) and bool((s.state.ssm == 1).all())
    assert not other.exists() and load_state(path, model).last_token == 2


def test_a_callers_metadata_check_refuses_a_file_before_the_target_state_is_touched(tiny, tmp_path):
    model, _, _ = tiny
    path = tmp_path / "s.state"
    save_state(path, model, filled_state(model, 1), 2, 1, extra={"chat": {"messages": []}})
    target, seen = model.new_state(1), []

    def refuse(meta):
        seen.append(json.loads(meta["chat"]))
        raise Mamba2Error("not this one")

    with pytest.raises(Mamba2Error, match="not this one"):
        load_state(path, model, into=target, check_metadata=refuse)
    assert seen == [{"messages": []}] and not target.conv.any() and not target.ssm.any()
    s = load_state(path, model, into=target, check_metadata=seen.append)
    assert s.state is target and bool((target.ssm == 1).all()) and seen[-1] is s.metadata


WRITER = """
import os, sys, time
from mamba2_cli import load_model
from mamba2_cli.statefile import save_state
model, _ = load_model(sys.argv[1], device="cpu", dtype="float32")
path, value, stop = sys.argv[2], int(sys.argv[3]), sys.argv[4]
state = model.new_state(1)
state.conv.fill_(value)
state.ssm.fill_(value)
name = "w" * value * 40  # the two writers' headers differ in length, so their data starts apart
give_up = time.monotonic() + 60
while True:
    save_state(path, model, state, value + 1, value, model_name=name)
    print("saved", flush=True)
    if os.path.exists(stop) or time.monotonic() > give_up:
        break
"""


def test_a_reader_always_loads_one_whole_save_while_two_writers_replace_the_file(tiny, tmp_path):
    """Saves are atomic renames and a load reads one open file: every load gives the state
    and the last token of one save, never a false checksum error or a mixed pair."""
    import time

    model, tok, d = tiny
    path, stop = tmp_path / "s.state", tmp_path / "stop"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(d), str(path), str(v), str(stop)],
                                stdout=subprocess.PIPE, env=env) for v in (1, 2)]
    seen, failures = [], []
    try:
        for w in writers:
            assert w.stdout.readline() == b"saved\n"
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline and len(seen) < 400:
            verify = len(seen) % 2 == 0
            try:
                s = load_state(path, model, verify=verify)
            except Mamba2Error as e:
                failures.append(str(e))
                continue
            finally:
                seen.append(None)
            v = s.last_token
            if not (v in (1, 2) and s.tokens == v + 1 and bool((s.state.conv == v).all())
                    and bool((s.state.ssm == v).all())):
                failures.append(f"mixed: last_token {v}, tokens {s.tokens}, verify={verify}")
    finally:
        stop.touch()
        for w in writers:
            w.stdout.read()
            w.wait(timeout=60)
    assert failures == [], f"{len(failures)} of {len(seen)} loads: {failures[:3]}"
    assert [w.returncode for w in writers] == [0, 0]


def test_a_symlink_planted_where_a_save_writes_is_never_followed(tiny, tmp_path, monkeypatch):
    from mamba2_cli import statefile

    model, tok, _ = tiny
    victim, absent = tmp_path / "victim", tmp_path / "absent"
    victim.write_bytes(b"precious")
    states = tmp_path / "states"
    states.mkdir()
    path = states / "s.state"
    # at the name a temporary file of this process would once have had, and at the destination
    (states / f".s.state.{os.getpid()}.tmp").symlink_to(victim)
    (states / "t.state").symlink_to(absent)
    saved_after(model, tok, tok.encode(A), path)
    saved_after(model, tok, tok.encode(A), states / "t.state")
    assert victim.read_bytes() == b"precious" and not absent.exists()
    assert load_state(path, model).tokens == load_state(states / "t.state", model).tokens == len(tok.encode(A))
    assert not (states / "t.state").is_symlink()  # the link itself was replaced
    # a temporary name guessed in advance: the save fails rather than write through the link
    for target in (victim, absent):
        guessed = states / f".guessed-{target.name}"
        guessed.symlink_to(target)
        monkeypatch.setattr(statefile, "_temporary_name", lambda p: guessed)
        with pytest.raises(Mamba2Error, match="cannot write state file") as e:
            saved_after(model, tok, tok.encode(A + B), path)
        assert "\n" not in str(e.value) and guessed.is_symlink()
    assert victim.read_bytes() == b"precious" and not absent.exists()
    assert load_state(path, model).tokens == len(tok.encode(A))
