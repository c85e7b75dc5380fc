"""The `mamba2` command: parses flags, prints, and calls the library. Nothing else lives here.

One module per command; options that several commands share are declared once in
options.py, and what every command prints or exits with is in common.py.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
import typer.core

from .. import __version__
from ..errors import Mamba2Error
from ..kernels import kernel_failure
from . import bench, chat, download, eval, info, models, quantize, run, serve
from .common import EXIT_INTERRUPTED, EXIT_SIGPIPE, EXIT_USER_ERROR, print_error, silence_stdout

def _plain_flags(params):
    """Flags take no value: no `<bool>` beside them in the help."""
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class _Command(typer.core.TyperCommand):
    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


class _Group(typer.core.TyperGroup):
    command_class = _Command

    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(
    cls=_Group,
    add_completion=True,  # --install-completion and --show-completion for bash, zsh, fish, PowerShell
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Generate text with Mamba-2 language models.",
)


def version_text() -> str:
    """mamba2's version and what it runs on: torch, Triton, CUDA, the GPU."""
    import torch

    try:
        from importlib.metadata import version as installed

        triton = installed("triton")
    except Exception:
        triton = "not installed"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"mamba2 {__version__}\ntorch {torch.__version__} · Triton {triton} · "
            f"CUDA {torch.version.cuda or 'none (CPU build)'} · GPU {gpu}")


def version():
    """Print the version, with torch, Triton, CUDA and the GPU."""
    typer.echo(version_text())


def _show_version(shown: bool):
    if shown:
        version()
        raise typer.Exit()


@app.callback()
def _options(show: Annotated[bool, typer.Option(
        "--version", callback=_show_version, is_eager=True, help="Print the version, with torch, Triton, CUDA and "
        "the GPU.")] = False):
    """Generate text with Mamba-2 language models."""


for command in (run.run, chat.chat, serve.serve, bench.bench, eval.eval, quantize.quantize, download.download,
                models.models, info.info, version):
    app.command(cls=_Command)(command)


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
    except Exception as e:
        kernel = kernel_failure(e)  # a Triton kernel that does not compile or launch on this GPU
        if kernel is not None:
            print_error(kernel)
        elif isinstance(e, RuntimeError) and "out of memory" in str(e).lower():
            print_error("out of memory on the device; try a smaller --batch-size, a shorter prompt or --dtype bfloat16")
        else:
            raise
        code = EXIT_USER_ERROR
    sys.exit(code if isinstance(code, int) else 0)
