"""Chat: the template is applied, each turn reads only its own tokens, and the carried state
gives the same replies as re-reading the whole conversation."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from checkpoints import tiny_shape
import mamba2_cli
from mamba2_cli import Mamba2Error, load_model
from mamba2_cli.chat import ChatSession, ChatTemplate

# The subprocesses run the package this process imported: the source tree under
# PYTHONPATH=src, the installed wheel in CI.
ENV = {**os.environ, "PYTHONPATH": str(Path(mamba2_cli.__file__).parents[1]), "COLUMNS": "200"}
ENV.pop("CUDA_VISIBLE_DEVICES", None)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A tiny model with Codestral's tokenizer and its [INST] ... [/INST] chat template."""
    import checkpoints

    d = tmp_path_factory.mktemp("chat-model")
    shape = tiny_shape(vocab_size=32768)
    checkpoints.write_mistral(d, shape, checkpoints.random_weights(shape, seed=6))
    checkpoints.copy_mistral_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def sp(sp_dir):
    return load_model(str(sp_dir), device="cpu", dtype="float32")


def reply(session, text, **kw):
    return [e for e in session.send(text, **kw)][-1].result


def turn_ids(tok, text):
    """What the [INST] template adds for a later user turn (before it: the previous reply)."""
    return tok.encode(f"</s>[INST] {text} [/INST]", add_bos=False)


def test_the_models_chat_template_is_applied(sp):
    model, tok = sp
    s = ChatSession(model, tok, max_tokens=4)
    assert not s.template.is_fallback
    want = tok.encode("<s>[INST] hello there [/INST]", add_bos=False)
    assert want[:2] == [tok.bos_id, tok.tok.token_to_id("[INST]")]
    assert s.conversation_ids([{"role": "user", "content": "hello there"}]) == want
    reply(s, "hello there")
    assert s.last_turn["prefill_tokens"] == len(want)


def test_each_turn_prefills_only_what_the_template_adds(sp):
    model, tok = sp
    s = ChatSession(model, tok, max_tokens=5)
    r1 = reply(s, "hello there")
    assert r1.finish_reason == "length"
    for text in ("second question", "third question"):
        reply(s, text)
        # the previous reply's last token (sampled, not yet read) + the template's new text
        assert s.last_turn["prefill_tokens"] == 1 + len(turn_ids(tok, text))
        assert not s.last_turn["reread"]
    assert s.ids == s.conversation_ids(s.messages, add_generation_prompt=False)[: len(s.ids)]


def test_carried_state_replies_like_rereading_the_conversation(sp):
    model, tok = sp
    s = ChatSession(model, tok, max_tokens=6)
    for text in ("hello there", "second question"):
        reply(s, text)
    fresh = ChatSession(model, tok, max_tokens=6)
    fresh.messages = [dict(m) for m in s.messages]  # same conversation, nothing read yet
    a, b = reply(s, "third"), reply(fresh, "third")
    assert a.token_ids == b.token_ids
    assert fresh.last_turn["reread"] and fresh.last_turn["prefill_tokens"] > 3 * s.last_turn["prefill_tokens"]


def test_save_then_load_reproduces_the_next_reply(sp, tmp_path):
    model, tok = sp
    settings = dict(max_tokens=6, temperature=0.9, seed=11)
    s = ChatSession(model, tok, system="be brief", **settings)
    reply(s, "hello there")
    reply(s, "second question")
    s.save(tmp_path / "chat.state")
    want = reply(s, "third")
    t = ChatSession(model, tok, **settings)
    t.load(tmp_path / "chat.state")
    assert t.system == "be brief" and len(t.messages) == 4
    assert reply(t, "third").token_ids == want.token_ids
    assert t.last_turn["prefill_tokens"] == s.last_turn["prefill_tokens"]


def test_a_stopped_or_cut_reply_keeps_the_conversation_consistent(sp):
    model, tok = sp
    s = ChatSession(model, tok, max_tokens=40)
    steps = []
    r = reply(s, "hello there", cancel=lambda: steps.append(1) or len(steps) >= 3)
    assert r.finish_reason == "cancelled" and len(r.token_ids) == 3
    free = ChatSession(model, tok, max_tokens=20)
    free.messages = [dict(m) for m in s.messages]
    text = reply(free, "second").text
    s.stop = (text[4:7],)  # a stop string the next reply runs into
    cut = reply(s, "second")
    assert cut.finish_reason == "stop"
    fresh = ChatSession(model, tok, max_tokens=40)
    fresh.messages = [dict(m) for m in s.messages]
    s.stop = ()
    assert reply(s, "third").token_ids == reply(fresh, "third").token_ids


def test_a_new_system_prompt_rereads_the_conversation(make_checkpoint):
    d, _, _ = make_checkpoint("hf")
    model, tok = load_model(str(d), device="cpu", dtype="float32")
    s = ChatSession(model, tok, max_tokens=4)
    assert s.template.is_fallback and "\nUser:" in s.stop  # this tokenizer has no chat template
    assert s.template.render([{"role": "user", "content": "hi"}]) == "<s>User: hi\nAssistant:"
    # A reply cut by the stop string has already read the start of the next turn ("\nUser:"):
    # that text is not read twice.
    said = tok.encode("<s>User: hi\nAssistant:", add_bos=False)
    gen = tok.encode(" hello\nUser:", add_bos=False)
    cut = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " hello", "ids": gen,
                                                "overshoot": "\nUser:"}, {"role": "user", "content": "more"}]
    assert s.conversation_ids(cut) == said + gen + tok.encode(" more\nAssistant:", add_bos=False)
    reply(s, "hi")
    s.set_system("You write Python.")
    reply(s, "more")
    assert s.last_turn["reread"]
    assert s.last_turn["prefill_tokens"] == len(s.conversation_ids(s.messages[:-1]))


def test_templates_run_in_a_sandbox(sp):
    _, tok = sp
    evil = ChatTemplate(tok, "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Mamba2Error, match="chat template"):
        evil.render([{"role": "user", "content": "x"}])
    strict = ChatTemplate(tok, "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}")
    with pytest.raises(Mamba2Error, match="no system"):
        strict.render([{"role": "system", "content": "x"}])
    with pytest.raises(Mamba2Error, match="does not compile"):
        ChatTemplate(tok, "{% for %}")


# A template is untrusted code: it gets RENDER_SECONDS and RENDER_BYTES, and no step builds a
# value past a million items; past a bound, the render is a one-line error.
ATTACKS = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested loops over a string": "{% set s = 'a' * 1000000 %}{% for i in s %}{% for j in s %}{% endfor %}{% endfor %}",
    "exponential macro": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(60) }}",
}
OVERSIZED = {
    "range(10**9)": "{% for i in range(10**9) %}{% endfor %}",
    "huge range": "{{ range(2**70)|length }}",
    "repetition": "{{ 'a' * 3000000000 }}",
    "repetition of a float": "{{ 'a' * 3e9 }}",
    "repetition of a list": "{{ ['a'] * (3e9|int) }}",
    "doubling by ~": "{% set ns = namespace(s='a') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling by +": "{% set ns = namespace(s=[1]) %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "nested list printed": "{% set ns = namespace(l=['a']) %}{% for i in range(30) %}{% set ns.l = [ns.l, ns.l] %}"
                           "{% endfor %}{{ ns.l }}",
    "width argument": "{{ 'a'|center(3000000000) }}{{ 'a'.ljust(3000000000) }}",
    "format width": "{{ '%3000000000s' % 'a' }}",
    "format method width": "{{ '{:>3000000000}'.format('a') }}",
    "power": "{{ 10 ** (10 ** 9) }}",
    "output": "{% for i in range(100000) %}{% for j in range(100) %}xx{% endfor %}{% endfor %}",
}
# Inputs each under the size bound whose product is not (90 GB of text): refused from the
# inputs' sizes, before anything is built.
PRODUCTS = {
    "join filter": "{% set s = 'a' * 300000 %}{{ (s|list)|join(s)|length }}",
    "join method": "{% set s = 'a' * 300000 %}{{ s.join(s|list)|length }}",
    "replace filter": "{% set s = 'a' * 300000 %}{{ s|replace('a', s)|length }}",
    "replace method": "{% set s = 'a' * 300000 %}{{ s.replace('a', s)|length }}",
    "indent filter": "{% set s = '\\n' * 300000 %}{{ s|indent(300000)|length }}",
}


@pytest.mark.parametrize("name", ATTACKS)
def test_a_template_past_the_time_bound_is_stopped(sp, name):
    from mamba2_cli import chat

    _, tok = sp
    t0 = time.perf_counter()
    with pytest.raises(Mamba2Error, match=r"^the chat template was stopped: it ran for more than 2 s$"):
        ChatTemplate(tok, ATTACKS[name]).render([{"role": "user", "content": "x"}])
    assert chat.RENDER_SECONDS <= time.perf_counter() - t0 < chat.RENDER_SECONDS + 0.5


@pytest.mark.parametrize("name", OVERSIZED)
def test_a_template_building_a_huge_value_is_stopped_at_once(sp, name):
    _, tok = sp
    t0 = time.perf_counter()
    with pytest.raises(Mamba2Error, match=r"^the chat template (was stopped|failed on this conversation): [^\n]+$") as e:
        ChatTemplate(tok, OVERSIZED[name]).render([{"role": "user", "content": "x"}])
    assert "ran for more than" not in str(e.value) and time.perf_counter() - t0 < 1.5  # refused before it ran long


@pytest.mark.parametrize("name", PRODUCTS)
def test_a_template_multiplying_two_bounded_inputs_is_refused_before_building(sp, name):
    _, tok = sp
    with pytest.raises(Mamba2Error, match=r"^the chat template was stopped: the (output|result) of [^\n]+ would hold "):
        ChatTemplate(tok, PRODUCTS[name]).render([{"role": "user", "content": "x"}])


def test_the_bounds_leave_a_normal_template_as_it_was(sp):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    model, tok = sp
    source = ("{% for m in messages %}{{ loop.index }}/{{ loop.length }} {{ m['role']|upper ~ ': ' ~ m.content }}"
              "{% if not loop.last %}\n{% endif %}{% else %}none{% endfor %}{{ range(3)|list }}"
              "{{ '%05d|%s' % (3, 'q') }}{{ '{}-{}'.format(1, 2) }}{{ [1, 2]|join(', ') }}{{ 'ab' * 3 }}"
              "{% if add_generation_prompt %}{{ 'é' * 2 }}{% endif %}")
    messages = [{"role": "user", "content": "hello " * 5000}, {"role": "assistant", "content": "x"}]
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    assert ChatTemplate(tok, source).render(messages) == plain.render(messages=messages, add_generation_prompt=True)
    codestral = ChatTemplate(tok)  # the model's own template
    long = [{"role": "user", "content": "word " * 1000}, {"role": "assistant", "content": "reply"}] * 50
    t0 = time.perf_counter()
    assert codestral.render(long).count("[INST]") == 50
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("command", ["run", "chat"])
def test_a_runaway_template_is_a_one_line_error_in_the_cli(make_checkpoint, command):
    import json

    d, _, _ = make_checkpoint("hf")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = OVERSIZED["range(10**9)"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    if command == "run":
        p = subprocess.run([sys.executable, "-m", "mamba2_cli", "run", "-m", str(d), "--device", "cpu", "-n", "2",
                            "--chat", "hello"], capture_output=True, env=ENV, timeout=120)
    else:
        p = chat(d, "hello\n", "-n", "2")
    err = p.stderr.decode()
    assert err.startswith("error: the chat template was stopped: an argument of 1e+09") and err.count("\n") == 1, err
    assert p.returncode != 0 or command == "chat"  # the chat reports the turn and goes on to the next


# ---------------------------------------------------------------------------------------
# The terminal chat, end to end


def chat(model_dir, script: str, *args):
    return subprocess.run([sys.executable, "-m", "mamba2_cli", "chat", "-m", str(model_dir), "--device", "cpu",
                           "-q", *args], input=script.encode(), capture_output=True, env=ENV, timeout=120)


def test_chat_script_stats_multiline_input_and_save_load(sp_dir, sp, tmp_path):
    _, tok = sp
    saved = tmp_path / "c.state"
    third = '"""\nthird\n\nblock of lines\n"""\n'
    p = chat(sp_dir, f"hello there\n/stats\nsecond \\\nq\n/stats\n/save {saved}\n{third}/nope\n/exit\nnever sent\n",
             "-n", "6")
    assert p.returncode == 1, p.stderr.decode()  # the script ran to /exit; its unknown command is an error
    out = p.stdout.decode()
    counts = [int(n) for n in re.findall(r"prefill (\d+) tokens", out)]
    assert counts == [len(tok.encode("<s>[INST] hello there [/INST]", add_bos=False)),
                      1 + len(turn_ids(tok, "second \nq"))]
    assert p.stderr.decode() == "error: unknown command /nope; /help lists them\n"
    reply3 = out.split(f"to {saved}\n")[1]
    q = chat(sp_dir, f"/load {saved}\n{third}/stats\n", "-n", "6")
    assert q.returncode == 0, q.stderr.decode()
    resumed = q.stdout.decode().split(f"from {saved}\n")[1]
    assert reply3.strip() and resumed.startswith(reply3) and "conversation: 6 messages" in resumed


def test_chat_in_a_terminal_ctrl_c_stops_the_reply_ctrl_d_leaves(sp_dir, tmp_path):
    import pty
    import select
    import signal

    env = {**ENV, "MAMBA2_CHAT_HISTORY": str(tmp_path / "history")}
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(sys.executable, [sys.executable, "-m", "mamba2_cli", "chat", "-m", str(sp_dir), "--device", "cpu",
                                   "-q", "-n", "100000"], env)
    seen = b""

    def read_until(marker: bytes, after: int, timeout=60) -> int:
        """Read until `marker` shows up past offset `after`; returns the offset just past it."""
        nonlocal seen
        end = time.time() + timeout
        while (at := seen.find(marker, after)) < 0:
            assert time.time() < end, seen.decode(errors="replace")
            if select.select([fd], [], [], 0.2)[0]:
                seen += os.read(fd, 4096)
        return at + len(marker)

    status = None
    try:
        pos = read_until(b">>> ", 0)
        os.write(fd, b"hello there\r")
        end = time.time() + 60
        while len(seen) - pos < 200 and time.time() < end:  # the reply is streaming
            if select.select([fd], [], [], 0.2)[0]:
                seen += os.read(fd, 4096)
        os.write(fd, b"\x03")  # Ctrl-C
        pos = read_until(b">>> ", read_until(b"[stopped]", pos))  # back at the prompt, still in the chat
        os.write(fd, b"/stats\r")
        pos = read_until(b">>> ", read_until(b"in the state", pos))
        os.write(fd, b"\x04")  # Ctrl-D
        end = time.time() + 30
        while status is None and time.time() < end:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    pass
            done, st = os.waitpid(pid, os.WNOHANG)
            status = st if done else None
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert status is not None and os.waitstatus_to_exitcode(status) == 0, seen.decode(errors="replace")
    assert b"(cancelled)" in seen and b"Traceback" not in seen
    assert (tmp_path / "history").read_text().splitlines()[-2:] == ["hello there", "/stats"]


def test_run_chat_wraps_one_prompt_in_the_template(sp_dir, sp):
    import json

    from mamba2_cli import generate

    model, tok = sp
    p = subprocess.run([sys.executable, "-m", "mamba2_cli", "run", "-m", str(sp_dir), "--device", "cpu", "-n", "8",
                        "--json", "--chat", "hello there"], capture_output=True, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr.decode()
    r = json.loads(p.stdout)
    ids = tok.encode("<s>[INST] hello there [/INST]", add_bos=False)
    assert r["prompt_tokens"] == len(ids) and r["token_ids"] == generate(model, tok, ids, max_tokens=8).token_ids
