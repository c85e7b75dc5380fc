"""Chat: the model's chat template, and a conversation carried in the recurrent state.

A transformer re-reads (or caches) the whole conversation every turn; a Mamba-2 model only
needs its state. So a turn renders the whole conversation with the template, tokenizes it,
checks that what the state has already consumed is a prefix of it, and prefills only the
rest: turn N costs what turn 1 costs. When the prefix does not match (a new system
prompt, a template that rewrites history) the conversation is re-read from the start.

Token ids of a conversation are the template's text tokenized piece by piece, with each
assistant reply's text replaced by the ids the model generated for it. Tokenizing a reply's
text again would not always give back those ids (the model may pick a non-canonical
split), and then every turn would have to re-read the conversation.
"""

from __future__ import annotations

import functools
import json
import math
import re
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Callable, Iterator

from .errors import Mamba2Error
from .generation import GenerationEvent, stream_generate
from .model import Mamba2LM
from .statefile import load_state, save_state
from .tokenizer import Tokenizer

# For models without a chat template (base models): plain text turns. Base models do not end
# a reply with an end-of-text token, so a reply also stops where the model starts the user's
# next line. The assistant's text follows "Assistant:" directly: the model writes the space.
FALLBACK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant:{{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
FALLBACK_STOP = ("\nUser:",)

# Stands in for a reply's text while rendering (private-use characters survive `trim`).
_MARK = "\ue000{}\ue001"


class ChatTemplate:
    """A jinja2 chat template (from tokenizer_config.json, or the plain fallback), rendered
    in a bounded jinja2 sandbox: templates come with downloaded models and are not trusted."""

    def __init__(self, tokenizer: Tokenizer, source: str | None = None):
        from jinja2 import TemplateError

        self.tokenizer = tokenizer
        source = source if source is not None else _pick_template(tokenizer.chat_template)
        self.is_fallback = source is None
        self.stop: tuple[str, ...] = FALLBACK_STOP if self.is_fallback else ()
        # The environment chat templates are written for (transformers' apply_chat_template):
        # trimmed blocks, break/continue, the {% generation %} block, an unescaped tojson, and the
        # globals raise_exception and strftime_now.
        env = _bounded_sandbox()(trim_blocks=True, lstrip_blocks=True,
                                 extensions=["jinja2.ext.loopcontrols", _generation_block()])
        env.filters["tojson"] = env.wrap_filter(_tojson)
        env.globals["raise_exception"] = _raise_from_template
        env.globals["strftime_now"] = _strftime_now
        try:
            self.template = env.from_bounded_string(source if source is not None else FALLBACK_TEMPLATE)
        except (TemplateError, RecursionError) as e:
            where = f" in {tokenizer.path.parent / 'tokenizer_config.json'}" if tokenizer.path else ""
            raise Mamba2Error(f"the chat template{where} does not compile: {e}") from None

        def text(i):
            return tokenizer.tok.id_to_token(i) if i is not None else None

        bos = text(tokenizer.bos_id) if (tokenizer.add_bos or not self.is_fallback) else None
        # Every special token the tokenizer's files name reaches the template; bos, eos and pad
        # fall back to the tokenizer's ids (an empty string when it has none).
        named = {} if self.is_fallback else _special_tokens(tokenizer.path.parent if tokenizer.path else None)
        self.variables = {"bos_token": bos or "", "eos_token": text(tokenizer.eos_id) or "",
                          "pad_token": text(tokenizer.pad_id) or "", **named}

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               documents: list[dict] | None = None) -> str:
        """The template's text for `messages` (and the tools and documents, for templates that show
        them); refused past RENDER_SECONDS or RENDER_BYTES."""
        from jinja2 import TemplateError

        token = _deadline.set(time.monotonic() + RENDER_SECONDS)
        try:
            chunks, size = [], 0
            for chunk in self.template.generate(messages=messages, tools=tools, documents=documents,
                                                add_generation_prompt=add_generation_prompt, **self.variables):
                size += len(chunk.encode("utf-8", "surrogatepass"))
                if size > RENDER_BYTES:
                    raise _Stopped(f"its text passed {RENDER_BYTES:,} bytes")
                _check_time()
                chunks.append(chunk)
            return "".join(chunks)
        except _Stopped as e:
            raise Mamba2Error(f"the chat template was stopped: {e}") from None
        except TemplateError as e:
            raise Mamba2Error(f"the chat template refused this conversation: {e}") from None
        except Exception as e:  # the template is untrusted code: whatever it raises is its failure
            raise Mamba2Error(f"the chat template failed on this conversation: {type(e).__name__}: {e}") from None
        finally:
            _deadline.reset(token)

    def shows_system_prompt(self) -> bool:
        """Whether the template renders a system message at all (some drop it silently)."""
        user = [{"role": "user", "content": "x"}]
        try:
            return self.render([{"role": "system", "content": "\ue002"}] + user) != self.render(user)
        except Mamba2Error:
            return False

    def prompt_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered conversation (the template writes any BOS itself)."""
        return self.tokenizer.encode(self.render(messages, add_generation_prompt), add_bos=False)


# The bounds on a template: jinja2's sandbox keeps it from reaching Python's internals, these
# keep it from running away with the time or the memory. The time is checked between output
# chunks, at every loop iteration, call, attribute, subscript and intercepted operator; sizes
# are checked before an operation builds a value, so no single step allocates much more than
# _MAX_ITEMS items: repetition (`'a' * 3000000000`), concatenation (`+`, `~`), powers,
# ranges, numbers given to filters and methods (`center(3000000000)`) and format widths.
RENDER_SECONDS = 2.0
RENDER_BYTES = 1_000_000
_MAX_ITEMS = 1_000_000  # characters of a string, items of a list, bits of an integer
_MAX_RANGE = 100_000
_WIDE_NUMBER = re.compile(r"\d{7}")  # a format width of a million or more

_deadline: ContextVar[float] = ContextVar("chat_template_deadline", default=math.inf)


class _Stopped(Exception):
    """A template went past a bound (raised from inside the render, which passes it on)."""


def _check_time() -> None:
    if time.monotonic() > _deadline.get():
        raise _Stopped(f"it ran for more than {RENDER_SECONDS:g} s")


def _size(value, budget: int = _MAX_ITEMS) -> int:
    """Characters and items in `value`, counted through nested lists and dicts until past `budget`."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if not isinstance(value, _CONTAINERS):
        return 1
    n = len(value)  # each item counts once, a string or container item by its own size too
    for item in (value.items() if isinstance(value, dict) else value):
        if n > budget:
            break
        if isinstance(item, (str, bytes, *_CONTAINERS)):
            n += _size(item, budget - n)
    return n


_CONTAINERS = (list, tuple, dict, set, frozenset)


def _check_size(n: int, what: str) -> None:
    if n > _MAX_ITEMS:
        raise _Stopped(f"{what} would hold {n:,} items (at most {_MAX_ITEMS:,})")


def _check_numbers(args, kwargs) -> None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not abs(v) <= _MAX_ITEMS:
            raise _Stopped(f"an argument of {v:g} (at most {_MAX_ITEMS:,})")


def _check_format(fmt) -> None:
    if isinstance(fmt, str) and _WIDE_NUMBER.search(fmt):
        raise _Stopped("a format string with a width of a million or more")


def _grown_size(name: str, value, args, kwargs) -> int | None:
    """The size of what the filter `name` (do_join, do_replace, do_indent; str.join and
    str.replace go through the first two) would build from inputs already bounded one
    by one (each can multiply one input by another: `(s|list)|join(s)`), or None."""
    first = (*args, *kwargs.values())[0] if args or kwargs else None
    if name == "do_join" and hasattr(value, "__len__"):
        sep = kwargs.get("d", first if isinstance(first, str) else "")
        return _size(value) + len(sep) * max(len(value) - 1, 0)
    if name == "do_replace" and isinstance(value, str) and len(args) + len(kwargs) >= 2:
        old, new = (list(args) + list(kwargs.values()))[:2]
        old, new = str(old), str(new)
        hits = len(value) + 1 if old == "" else value.count(old)
        return len(value) + hits * max(len(new) - len(old), 0)
    if name == "do_indent" and isinstance(value, str):
        width = kwargs.get("width", first if first is not None else 4)
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return len(value) + (value.count("\n") + 1) * max(pad, 0)
    return None


def _bounded_range(*args):
    r = range(*args)
    try:
        n = len(r)
    except OverflowError:
        n = math.inf
    if n > _MAX_RANGE:
        raise _Stopped(f"a range of {n:g} items (at most {_MAX_RANGE:,})")
    return r


@functools.cache
def _bounded_sandbox():
    from jinja2 import nodes, pass_context
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # Filters that take the context are never evaluated at compile time.
    @pass_context
    def timed_loop(context, iterable):
        for item in iterable:
            _check_time()
            yield item

    @pass_context
    def bounded_concat(context, items):
        _check_size(sum(_size(x) for x in items), "a concatenation")
        return "".join(map(str, items))

    def bounded_filter(f):
        @functools.wraps(f)  # keeps jinja's pass_context/pass_environment mark
        def run(*args, **kwargs):
            _check_time()
            _check_numbers(args[1:], kwargs)  # the arguments after the value filtered
            _check_size(sum(_size(a) for a in (*args, *kwargs.values())), f"the input of the filter {f.__name__}")
            if f.__name__ == "do_format":
                _check_format(next((a for a in args if isinstance(a, str)), None))
            # The value filtered follows the context or environment jinja passes first to a
            # filter marked for it.
            at = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0
            if len(args) > at:
                grown = _grown_size(f.__name__, args[at], args[at + 1:], kwargs)
                if grown is not None:
                    _check_size(grown, f"the output of the filter {f.__name__}")
            return f(*args, **kwargs)
        return run

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "+", "**", "%"})

        wrap_filter = staticmethod(bounded_filter)  # for filters added after __init__

        def __init__(self, **options):
            super().__init__(finalize=self.bounded_output, **options)
            self.globals["range"] = _bounded_range
            self.filters = {name: bounded_filter(f) for name, f in self.filters.items()}
            self.filters["bounded_loop"], self.filters["bounded_concat"] = timed_loop, bounded_concat

        def from_bounded_string(self, source: str):
            """Compile `source` with every loop checking the clock and every `~` its size."""
            tree = self.parse(source)
            for loop in list(tree.find_all(nodes.For)):
                loop.iter = nodes.Filter(loop.iter, "bounded_loop", [], [], None, None, lineno=loop.lineno)
            for concat in list(tree.find_all(nodes.Concat)):
                items = nodes.List(concat.nodes, lineno=concat.lineno)
                concat.nodes = [nodes.Filter(items, "bounded_concat", [], [], None, None, lineno=concat.lineno)]
            return self.from_string(tree)

        @staticmethod
        def bounded_output(value):
            _check_time()
            _check_size(_size(value), "an output value")
            return value

        def call_binop(self, context, operator, left, right):
            _check_time()
            if operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    _check_size(_size(seq) * n, "a repetition")
                elif isinstance(left, int) and isinstance(right, int):
                    _check_size(left.bit_length() + right.bit_length(), "a product")
            elif operator == "+" and isinstance(left, (str, bytes, list, tuple)):
                _check_size(_size(left) + _size(right), "a concatenation")
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                _check_size(max(right, 0) * left.bit_length(), "a power")
            elif operator == "%":
                _check_format(left)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            _check_time()
            _check_numbers(args, kwargs)
            name = getattr(__obj, "__name__", None)
            if name in ("format", "format_map"):  # the sandbox wraps str.format
                _check_format(getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None))
            elif name in ("join", "replace"):  # str.join(items), str.replace(old, new)
                owner = getattr(__obj, "__self__", None)
                if isinstance(owner, str):
                    grown = (_grown_size("do_join", args[0], (owner,), {}) if name == "join" and args
                             else _grown_size("do_replace", owner, args, kwargs) if name == "replace" else None)
                    if grown is not None:
                        _check_size(grown, f"the result of str.{name}")
            return super().call(__context, __obj, *args, **kwargs)

        def getattr(self, obj, attribute):
            _check_time()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            _check_time()
            return super().getitem(obj, argument)

    return BoundedSandbox


def _pick_template(t) -> str | None:
    # tokenizer_config.json holds a string, or a list of named templates.
    if isinstance(t, list):
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default") or next(iter(named.values()), None)
    return t if isinstance(t, str) and t.strip() else None


# The special tokens a tokenizer's files can name (extra named ones come in `extra_special_tokens`).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _special_tokens(d: Path | None) -> dict[str, str]:
    """The named special tokens of tokenizer_config.json over special_tokens_map.json, as strings."""
    if d is None:
        return {}
    out = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
        try:
            cfg = json.loads((d / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(cfg, dict):
            continue
        extra = cfg.get("extra_special_tokens")
        named = {**(extra if isinstance(extra, dict) else {}), **{k: cfg[k] for k in SPECIAL_TOKEN_NAMES if k in cfg}}
        for key, value in named.items():
            value = value.get("content") if isinstance(value, dict) else value  # an AddedToken's fields
            if isinstance(key, str) and isinstance(value, str):
                out[key] = value
    return out


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    """JSON as chat templates expect it: characters as they are (no HTML escaping), with json.dumps' options."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    from datetime import datetime

    _check_format(fmt)
    return datetime.now().strftime(fmt)


@functools.cache
def _generation_block():
    """The {% generation %} ... {% endgeneration %} block some templates mark replies with: its body as it is."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return GenerationBlock


def _raise_from_template(message):
    from jinja2 import TemplateError

    raise TemplateError(message)


def one_shot_messages(prompt: str, system: str | None = None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


class ChatSession:
    """A conversation and the model state that has read it.

    `ids` are the tokens the state has consumed; `last_token` is the last reply's final
    token, sampled but not yet consumed (it leads the next turn's prefill when the
    template keeps it). Settings are stream_generate's; a seed makes turn n use seed + n.
    """

    def __init__(self, model: Mamba2LM, tokenizer: Tokenizer, system: str | None = None,
                 template: ChatTemplate | None = None, model_name: str | None = None, **settings):
        self.model, self.tokenizer = model, tokenizer
        self.template = template or ChatTemplate(tokenizer)
        self.model_name = model_name
        self.system = system or None
        self.settings = {"max_tokens": 512, **settings}
        if self.settings["max_tokens"] < 1:
            raise Mamba2Error("a chat reply needs max tokens >= 1")
        self.stop = tuple(self.settings.pop("stop", ())) + self.template.stop
        self.state = model.new_state(1)
        self.messages: list[dict] = []  # user and assistant turns; the system prompt is apart
        self.ids: list[int] = []
        self.last_token: int | None = None
        self.last_turn: dict = {}

    # -- the conversation as tokens ----------------------------------------------------

    def _with_system(self, messages: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def conversation_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the system prompt + `messages`, replies as the ids generated for them."""
        shown, replies = [], []
        for m in self._with_system(messages):
            if m["role"] == "assistant" and m.get("ids") is not None:
                shown.append({"role": "assistant", "content": _MARK.format(len(replies))})
                replies.append(m)
            else:
                shown.append({"role": m["role"], "content": m["content"]})
        text = self.template.render(shown, add_generation_prompt)
        encode = self.tokenizer.encode
        ids, pos, skip = [], 0, ""
        for k, m in enumerate(replies):
            at = text.find(_MARK.format(k), pos)
            if at < 0 or not text.startswith(skip, pos):  # the template rewrote a reply: plain text it is
                return self._plain_ids(messages, add_generation_prompt)
            ids += encode(text[pos + len(skip) : at], add_bos=False) + list(m["ids"])
            # Text the reply ran past its end (into a stop string) is in `ids` already.
            skip = m.get("overshoot") or ""
            pos = at + len(_MARK.format(k))
        if not text.startswith(skip, pos):
            return self._plain_ids(messages, add_generation_prompt)
        return ids + encode(text[pos + len(skip) :], add_bos=False)

    def _plain_ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        plain = [{"role": m["role"], "content": m["content"]} for m in self._with_system(messages)]
        return self.template.prompt_ids(plain, add_generation_prompt)

    # -- turns ---------------------------------------------------------------------------

    def send(self, text: str, cancel: Callable[[], bool] | None = None) -> Iterator[GenerationEvent]:
        """Stream the reply to a user message; the last event carries the result."""
        user = {"role": "user", "content": text}
        full = self.conversation_ids(self.messages + [user])
        before = self.ids
        if full[: len(before)] != before or len(full) <= len(before):
            self.state.reset()
            before = []
        reread = bool(self.messages) and not before  # the whole conversation goes through the model
        suffix = full[len(before) :]
        self.ids, self.last_token = [], None  # until the reply is complete the state is in flux
        settings = dict(self.settings)
        if settings.get("seed") is not None:
            settings["seed"] += sum(m["role"] == "assistant" for m in self.messages)
        result = None
        try:
            for event in stream_generate(self.model, self.tokenizer, suffix, state=self.state, stop=self.stop,
                                         cancel=cancel, **settings):
                if event.result is not None:
                    result = event.result
                    self._record(user, before + suffix, suffix, result, reread)
                yield event
        finally:
            if result is None:  # abandoned mid-reply: the state holds an unknown amount; re-read next turn
                self.state.reset()

    def _record(self, user: dict, prompt: list[int], suffix: list[int], result, reread: bool) -> None:
        gen = result.token_ids
        self.ids = prompt + gen[:-1]  # the last sampled token is never fed
        self.last_token = gen[-1]
        reply = gen[:-1] if result.finish_reason == "eos" else gen  # the template writes its own end
        full_text = self.tokenizer.decode_continuation(suffix, reply)
        overshoot = full_text[len(result.text):] if full_text.startswith(result.text) else None
        self.messages += [user, {"role": "assistant", "content": result.text,
                                 "ids": reply if overshoot is not None else None, "overshoot": overshoot}]
        self.last_turn = {"prefill_tokens": len(suffix), "reread": reread, "reply_tokens": len(gen),
                          "finish_reason": result.finish_reason, **result.stats}

    # -- commands ------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.state.reset()
        self.messages, self.ids, self.last_token, self.last_turn = [], [], None, {}

    def set_system(self, text: str | None) -> None:
        """A new system prompt changes the start of the conversation: the next turn re-reads it."""
        self.system = text or None

    @property
    def context_tokens(self) -> int:
        return len(self.ids) + (self.last_token is not None)

    def save(self, path: str | Path) -> Path:
        if self.last_token is None:
            raise Mamba2Error("nothing to save yet: the conversation has no reply")
        chat = {"system": self.system, "messages": self.messages, "ids": self.ids}
        return save_state(path, self.model, self.state, self.context_tokens, self.last_token,
                          extra={"chat": chat}, model_name=self.model_name)

    def load(self, path: str | Path) -> None:
        """Continue a conversation saved by save(); the session is unchanged if it fails."""
        conversation = {}

        def check(meta: dict) -> None:  # on the file load_state reads, before any state is read
            if "chat" not in meta:
                raise Mamba2Error(f"{path} holds no conversation (it was not saved by mamba2 chat); "
                                  "`mamba2 run --load-state` continues it")
            try:
                chat = json.loads(meta["chat"])
                messages, ids, system = chat["messages"], [int(i) for i in chat["ids"]], chat.get("system")
                ok = isinstance(messages, list) and all(
                    isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
                    for m in messages)
                ok = ok and str(len(ids) + 1) == meta.get("tokens") and (system is None or isinstance(system, str))
            except (ValueError, KeyError, TypeError, RecursionError):
                ok = False
            if not ok:
                raise Mamba2Error(f"{path}: damaged state file (its conversation does not add up)")
            conversation.update(messages=messages, ids=ids, system=system)

        saved = load_state(path, self.model, into=self.state, check_metadata=check)
        self.messages, self.ids, self.system = conversation["messages"], conversation["ids"], conversation["system"]
        self.last_token, self.last_turn = saved.last_token, {}
