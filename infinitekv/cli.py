"""`ikv`: the command line. Each command is a thin shell over a library function; errors a user can fix are
`IKVError`s printed as one line with exit code 2."""

from __future__ import annotations

import sys

import typer

from infinitekv.errors import IKVError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help="InfiniteKV: never drop a token of context.")
archive_app = typer.Typer(no_args_is_help=True, help="Pack, unpack and manage archives.")
bench_app = typer.Typer(no_args_is_help=True, help="Gates and benchmarks; each writes a receipt.")
app.add_typer(archive_app, name="archive")
app.add_typer(bench_app, name="bench")


def fail(message: str) -> None:
    """Print one line and exit 2: the only way a user-facing error leaves the CLI."""
    print(f"ikv: error: {message}", file=sys.stderr)
    raise typer.Exit(code=2)


def main() -> None:
    try:
        app()
    except IKVError as err:
        fail(str(err))
