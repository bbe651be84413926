"""The ``codeq`` command: parses arguments and calls the library, nothing more.

Only this module (and the report renderer) knows about the terminal. Every
failure the user can act on is a :class:`codeq_cli.errors.CodeqError`, printed
as one line on stderr with exit code 2 (usage) or 1 (runtime); ``--debug``
shows the traceback. Heavy imports (torch) happen inside the commands, so
``codeq --help`` answers at once.
"""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import click
import typer

from codeq_cli._version import __version__
from codeq_cli.errors import CodeqError

app = typer.Typer(
    name="codeq",
    help="Compress image classifiers with CoDeQ: joint pruning and quantization in one fine-tuning run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"codeq {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``codeq`` console script and ``python -m codeq_cli``."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app(args=args, prog_name="codeq", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors from the parser
        if debug:
            raise
        cmd = f"codeq {exc.ctx.command_path.split(' ', 1)[1]}" if getattr(exc, "ctx", None) and " " in exc.ctx.command_path else "codeq"
        print(f"error: {' '.join(exc.format_message().split())} (see '{cmd} --help')", file=sys.stderr)
        sys.exit(exc.exit_code)
    except CodeqError as exc:
        if debug or _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
