"""``morphcache store ...`` commands (placeholder until the store CLI lands)."""

import typer

app = typer.Typer(no_args_is_help=True)
