"""`moedisco upload` and `moedisco files ...`: corpus files on the server, through the API.

    moedisco upload corpus.jsonl                  # prints the path to name in data.train: users/<you>/uploads/...
    moedisco upload big.parquet --name c4.parquet --text-field content
    moedisco files list                           # your uploads; --shared: the shared area every job reads
    moedisco files rm corpus.jsonl
    moedisco upload corpus.jsonl --shared         # admins: into the shared area

They read MOEDISCO_API_URL and MOEDISCO_API_TOKEN. The server checks a file as a corpus before it keeps it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moedisco_cli.api_client import ApiClient
from moedisco_cli.common import api_call, console

files_app = typer.Typer(help="Your corpus files on the server (and the shared area's).", no_args_is_help=True)
SharedOpt = Annotated[bool, typer.Option("--shared", help="The shared area every user's jobs read (admins write).")]


def upload(file: Annotated[Path, typer.Argument(help="A local .jsonl, .json, .parquet or .txt corpus file.")],
           name: Annotated[str | None, typer.Option(help="Its name on the server; default: the file's.")] = None,
           text_field: Annotated[str, typer.Option(help="JSON/Parquet field with the text.")] = "text",
           shared: SharedOpt = False) -> None:
    """Upload a corpus file; prints the path a spec's data.train or data.eval names it by."""
    if not file.is_file():
        console.print(f"[red]{file}: not a file[/red]")
        raise typer.Exit(2)
    stored = api_call(ApiClient().upload, file, name, shared, text_field)
    console.print(f"{stored['path']}  ({stored['size']} bytes)")


@files_app.command("list")
def list_files(shared: SharedOpt = False) -> None:
    """Your uploads (or the shared area's files), with the path a spec names each by."""
    table = Table()
    for column in ("path", "bytes", "uploaded"):
        table.add_column(column)
    for stored in api_call(ApiClient().files, shared):
        table.add_row(stored["path"], str(stored["size"]), stored["modified"])
    console.print(table)


@files_app.command("rm")
def remove(name: Annotated[str, typer.Argument(help="The file's name (from `moedisco files list`).")],
           shared: SharedOpt = False) -> None:
    """Delete one of your uploads (admins: a shared file)."""
    api_call(ApiClient().delete_file, name, shared)
    console.print(f"deleted {name}")
