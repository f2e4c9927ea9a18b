"""``morphcache eval ...`` and ``morphcache report`` (placeholder)."""

import typer

eval_app = typer.Typer(no_args_is_help=True)


def report_command() -> int:
    """Write a Markdown + PNG report (not yet implemented)."""
    return 2
