"""The terminal side of `mamba2 chat`: line editing, multi-line input, commands, Ctrl-C.

The conversation itself (template, carried state, save/load) is chat.ChatSession; this
module reads what the user types and prints what comes back. Line editing and history come
from the standard library's readline (rich's prompt has neither). Without a terminal on
stdin (a script piped in) there is no prompt and no history: lines are read as they come.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Callable, TextIO

from ..chat import ChatSession
from ..errors import Mamba2Error

HELP = """\
/reset          start a new conversation (the system prompt stays)
/system TEXT    set the system prompt (/system alone clears it); the next turn re-reads the conversation
/save FILE      save the conversation and its state
/load FILE      continue a saved conversation
/stats          what the last turn cost
/exit           leave (Ctrl-D does too)
End a line with \\ to continue on the next one; a line with just \"\"\" starts or ends a block of lines.
Ctrl-C stops a reply and stays in the chat."""

PROMPT, MORE = ">>> ", "... "
BLOCK = '"""'


def _history_path() -> Path:
    env = os.environ.get("MAMBA2_CHAT_HISTORY")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "mamba2" / "chat_history"


class _LineReader:
    """input() with readline on a terminal; plain reads of stdin otherwise."""

    def __init__(self, interactive: bool):
        self.interactive = interactive
        self.readline = None
        if interactive:
            try:
                import readline
            except ImportError:  # not every Python has it; input() still works
                return
            self.readline = readline
            readline.set_history_length(1000)
            try:
                readline.read_history_file(_history_path())
            except OSError:
                pass

    def __call__(self, prompt: str) -> str:
        if self.interactive:
            return input(prompt)
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.removesuffix("\n").removesuffix("\r")

    def close(self) -> None:
        if self.readline is not None:
            try:
                path = _history_path()
                path.parent.mkdir(parents=True, exist_ok=True)
                self.readline.write_history_file(path)
            except OSError:
                pass


def read_message(read: Callable[[str], str]) -> str:
    """One message: a line; lines ending in a backslash continue; \"\"\" ... \"\"\" is a block."""
    line = read(PROMPT)
    if line.strip() == BLOCK:
        lines = []
        while (line := read(MORE)).strip() != BLOCK:
            lines.append(line)
        return "\n".join(lines)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        line = read(MORE)
    lines.append(line)
    return "\n".join(lines)


def format_stats(session: ChatSession) -> str:
    t = session.last_turn
    context = f"conversation: {len(session.messages)} messages, {session.context_tokens} tokens in the state"
    if not t:
        return f"no turn yet · {context}"

    def rate(v):
        return "–" if v is None else f"{v:,.1f} tok/s"

    how = "re-read the conversation" if t["reread"] else "from the carried state"
    return (f"last turn: prefill {t['prefill_tokens']} tokens ({how}), {rate(t['prefill_tok_s'])} · "
            f"reply {t['reply_tokens']} tokens ({t['finish_reason']}), {rate(t['decode_tok_s'])}\n{context}")


class ChatREPL:
    def __init__(self, session: ChatSession, out: TextIO | None = None, err: TextIO | None = None,
                 interactive: bool | None = None):
        self.session = session
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.interactive = sys.stdin.isatty() if interactive is None else interactive
        self.failed = False  # a script had an error: the command exits 1 after the script

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def error(self, text: str) -> None:
        self.err.write(f"error: {text}\n")
        self.err.flush()

    def run(self) -> None:
        read = _LineReader(self.interactive)
        if self.interactive:
            self.say("mamba2 chat · /help for commands · Ctrl-D to leave")
        try:
            while True:
                try:
                    text = read_message(read)
                except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line
                    self.out.write("\n")
                    continue
                except EOFError:
                    if self.interactive:
                        self.out.write("\n")
                    break
                try:
                    if text.startswith("/"):
                        if not self.command(text):
                            break
                    elif text.strip():
                        self.reply(text)
                except Mamba2Error as e:
                    self.error(str(e))
                    self.failed = not self.interactive
        finally:
            read.close()

    def reply(self, text: str) -> None:
        stopped = []

        def on_sigint(signum, frame):  # stop at the next token: the state stays consistent
            stopped.append(True)

        previous = signal.signal(signal.SIGINT, on_sigint)
        started = False
        try:
            for event in self.session.send(text, cancel=lambda: bool(stopped)):
                piece = event.text
                if not started:  # the reply's leading space belongs to the text, not the screen
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    self.out.write(piece)
                    self.out.flush()
        finally:
            signal.signal(signal.SIGINT, previous)
        self.out.write(" [stopped]\n" if stopped else "\n")
        self.out.flush()

    def command(self, line: str) -> bool:
        """Run a /command; False means leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        s = self.session
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            s.reset()
            self.say("new conversation")
        elif name == "/system":
            s.set_system(arg or None)
            shown = s.template.shows_system_prompt()
            if arg and not shown:
                self.say("note: this model's chat template leaves system prompts out")
            self.say(f"system prompt {'set' if arg else 'cleared'}"
                     + (": the next turn re-reads the conversation" if s.messages and shown else ""))
        elif name == "/stats":
            self.say(format_stats(s))
        elif name in ("/save", "/load"):
            if not arg:
                raise Mamba2Error(f"{name} needs a file name: {name} FILE")
            path = Path(arg).expanduser()
            if name == "/save":
                s.save(path)
                self.say(f"saved {s.context_tokens} tokens of conversation to {path}")
            else:
                s.load(path)
                self.say(f"loaded {len(s.messages)} messages ({s.context_tokens} tokens) from {path}")
        else:
            raise Mamba2Error(f"unknown command {name}; /help lists them")
        return True
