"""The ``morphcache`` command: one entry point, a subcommand per stage.

Each stage's command functions live in that stage's ``cli`` module and import their heavy dependencies lazily,
so ``morphcache --help`` starts fast. :func:`main` takes an argv list (tests call it directly) and returns the
exit code: 0 success, 1 a check found problems (e.g. ``store verify``), 2 bad input (one line on stderr).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Sequence

import typer

from morphcache.errors import MorphcacheError

app = typer.Typer(
    name="morphcache",
    help="Pay for the teacher once: cache teacher patch tokens in zarr, pretrain ViTs with DTM from the cache.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

schemas_app = typer.Typer(help="Versioned metadata models.", no_args_is_help=True)


@schemas_app.command("export")
def schemas_export(out_dir: Annotated[Path, typer.Argument(help="directory to write *.schema.json into")]) -> int:
    """Write the JSON Schema of every versioned model (StoreSpec, TeacherSpec, AugmentSpec, ViewParams, RunConfig)."""
    from morphcache.schemas.export import export_json_schemas

    for path in export_json_schemas(out_dir):
        typer.echo(str(path))
    return 0


def _register() -> None:
    from morphcache.demo import demo_command
    from morphcache.evaluate.cli import eval_app, report_command
    from morphcache.extract.cli import extract_command, replay_check_command, show_command
    from morphcache.store.cli import app as store_app
    from morphcache.study.cli import study_app
    from morphcache.train.cli import train_command

    store_app.command("replay-check")(replay_check_command)
    store_app.command("show")(show_command)
    app.add_typer(store_app, name="store", help="Inspect and check a feature store.")
    app.add_typer(schemas_app, name="schemas")
    app.command("extract")(extract_command)
    app.command("train")(train_command)
    app.add_typer(eval_app, name="eval", help="Evaluate a checkpoint or a reference model.")
    app.command("report")(report_command)
    app.command("demo")(demo_command)
    app.add_typer(study_app, name="study")


_register()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``) and return the exit code."""
    import click

    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, prog_name="morphcache", standalone_mode=False)
    except MorphcacheError as exc:
        print(f"morphcache: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return int(exc.exit_code or 0)
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        print("morphcache: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("morphcache: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return int(result or 0) if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
