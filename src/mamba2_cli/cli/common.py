"""What every command shares: exit codes, messages on stderr, reading the prompt, formatting."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from .. import __version__
from ..download import format_size as size  # noqa: F401  (the commands import it from here)

EXIT_USER_ERROR = 1
EXIT_INTERRUPTED = 130
EXIT_SIGPIPE = 141


def stderr_console():
    """Rich on stderr; off a terminal each message is one unwrapped line, for logs and scripts."""
    from rich.console import Console

    console = Console(stderr=True, highlight=False)
    console.soft_wrap = not console.is_terminal
    return console


def print_error(msg: str) -> None:
    from rich.markup import escape

    try:
        stderr_console().print(f"[bold red]error:[/] {escape(msg)}", soft_wrap=True)
    except Exception:
        sys.stderr.write(f"error: {msg}\n")


def fail(message: str, code: int = EXIT_USER_ERROR):
    """One line on stderr, then the exit code (1: the user asked for something that cannot be done)."""
    print_error(message)
    raise typer.Exit(code)


def silence_stdout() -> None:
    # Nothing more can reach the reader; point stdout at /dev/null so the interpreter's
    # own flush at exit does not complain.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass


def closed_stdout():
    """The reader went away (`| head`): end quietly with the shell's code for SIGPIPE."""
    silence_stdout()
    raise typer.Exit(EXIT_SIGPIPE)


def interrupted(out):
    """Ctrl-C while generating: what was written reaches the reader, then exit 130."""
    try:
        out.flush()
    except BrokenPipeError:
        pass
    stderr_console().print("\ninterrupted")
    raise typer.Exit(EXIT_INTERRUPTED)


def read_prompt(words: Optional[List[str]], file: Optional[Path]) -> str:
    """The prompt from the arguments, a file or stdin (one of them), as text."""
    if words and file:
        fail("give the prompt as arguments or with -f, not both")
    if words:
        return " ".join(words)
    if file is not None:
        try:
            data = file.read_bytes()
        except OSError as e:
            fail(f"cannot read prompt file {file}: {e.strerror or e}")
        source = str(file)
    else:
        if sys.stdin is None or sys.stdin.isatty():
            fail("no prompt: give it as an argument or with -p, pipe it on stdin, or use -f FILE; "
                 "to chat with the model, run mamba2 chat")
        data = sys.stdin.buffer.read()
        source = "stdin"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        fail(f"the prompt on {source} is not valid UTF-8 (byte {e.start})")
    # `echo` ends its line with a newline the user did not mean as part of the prompt.
    return text[:-1] if text.endswith("\n") else text


def read_prompt_or_nothing(words: Optional[List[str]], file: Optional[Path]) -> Optional[str]:
    """The prompt when one is given; None when there is none and nothing on stdin (continuing a state)."""
    if words or file is not None or (sys.stdin is not None and not sys.stdin.isatty()):
        return read_prompt(words, file) or None
    return None


def finite(value):
    """`value` with every NaN or infinity (dt_limit's open upper bound, a rate over zero time) as None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


# Characters that end a line for Python's str.splitlines and for JavaScript but that JSON leaves raw: escaped, so a
# record of JSON lines stays one line for every reader (generated text can hold any of them).
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dumps(obj, indent: int | None = None) -> str:
    """Strict JSON (RFC 8259) for every --json output: non-finite numbers are null, text is UTF-8, one line per record."""
    return json.dumps(finite(obj), indent=indent, ensure_ascii=False, allow_nan=False).translate(_LINE_BREAKS)


def versions() -> dict:
    import platform

    import torch

    v = {"mamba2": __version__, "torch": torch.__version__, "python": platform.python_version()}
    try:
        from importlib.metadata import version

        v["triton"] = version("triton")
    except Exception:
        v["triton"] = None
    return v


def count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def figure(v, unit: str, scale: float = 1.0, digits: int = 1) -> str:
    return "–" if v is None else f"{v * scale:,.{digits}f} {unit}"


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def progress(quiet: bool):
    from ..download import progress_display

    return progress_display(quiet)


def revision_of(model_dir: Path) -> str | None:
    """The snapshot hash a cached repo id resolved to (None for a plain directory)."""
    return model_dir.name if model_dir.parent.name == "snapshots" else None
