"""The `mamba2` command: parses flags, prints, and calls the library. Nothing else lives here.

One module per command; options that several commands share are declared once in
options.py, and what every command prints or exits with is in common.py.
"""

from __future__ import annotations

import sys

import typer

from .. import __version__
from ..errors import Mamba2Error
from . import bench, chat, download, eval, info, models, quantize, run
from .common import EXIT_INTERRUPTED, EXIT_SIGPIPE, EXIT_USER_ERROR, print_error, silence_stdout

app = typer.Typer(
    add_completion=True,  # --install-completion and --show-completion for bash, zsh, fish, PowerShell
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Generate text with Mamba-2 language models.",
)


def version():
    """Print the version."""
    typer.echo(__version__)


for command in (run.run, chat.chat, bench.bench, eval.eval, quantize.quantize, download.download, models.models,
                info.info, version):
    app.command()(command)


def main():
    """Entry point: every way out is an exit code and at most a short message, never a traceback."""
    # Typer ships its own copy of click: find click's exception base through Typer's names.
    click_error = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
    try:
        code = app(standalone_mode=False)
    except Mamba2Error as e:
        print_error(str(e))
        code = EXIT_USER_ERROR
    except (KeyboardInterrupt, typer.Abort):  # click turns Ctrl-C into Abort
        sys.stderr.write("\ninterrupted\n")
        code = EXIT_INTERRUPTED
    except BrokenPipeError:
        silence_stdout()
        code = EXIT_SIGPIPE
    except click_error as e:  # bad flags: usage and the reason, exit 2
        e.show()
        code = e.exit_code
    except MemoryError:
        print_error("out of memory")
        code = EXIT_USER_ERROR
    except RuntimeError as e:
        if "out of memory" not in str(e).lower():
            raise
        print_error("out of memory on the device; try a smaller --batch-size, a shorter prompt or --dtype bfloat16")
        code = EXIT_USER_ERROR
    sys.exit(code if isinstance(code, int) else 0)
