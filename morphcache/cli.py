"""The ``morphcache`` command: one entry point, a subcommand per stage.

Each stage's command functions live in that stage's ``cli`` module and import their heavy dependencies lazily,
so ``morphcache --help`` starts fast. :func:`main` takes an argv list (tests call it directly) and returns the
exit code: 0 success, 1 a check found problems (e.g. ``store verify``) or an internal error, 2 bad input (one line
on stderr), 130 interrupted (Ctrl-C) and 143 terminated (SIGTERM), both with one line saying that the same command
resumes. SIGTERM is turned into a :class:`Terminated` (a ``KeyboardInterrupt``) so ``finally:`` blocks run and
loader worker processes are stopped. An internal error (any exception that is not a :class:`~morphcache.errors.MorphcacheError`) prints one
line naming the command and the error and writes the full traceback to a file (:func:`write_traceback`), or
prints the traceback with ``--debug`` / ``MORPHCACHE_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import traceback
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


DEBUG_ENV = "MORPHCACHE_DEBUG"
INTERRUPTED = "morphcache: interrupted; run the same command again to resume"
INTERRUPTED_BY_TYPER = 130  # no command returns 130 itself


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (see :func:`main`): handled like Ctrl-C, exit code 143."""

    exit_code = 143


_TERMINATED: list[int] = []  # SIGTERM arrived during this main() call


def _raise_terminated(signum, frame) -> None:
    _TERMINATED.append(signum)
    raise Terminated()


def _install_sigterm_handler():
    """Make SIGTERM raise :class:`Terminated`; returns the previous handler (None off the main thread)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _interrupt_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt (or :class:`Terminated`) behind ``exc``: typer turns one into ``Exit(130)`` and click
    into ``Abort``, keeping it as the cause."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _interrupted(exc: KeyboardInterrupt | None = None) -> int:
    print(INTERRUPTED, file=sys.stderr)
    return 143 if _TERMINATED or isinstance(exc, Terminated) else 130
_GROUPS = ("store", "eval", "schemas")


@app.callback(invoke_without_command=True)
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help=f"on an unexpected error print the full traceback instead of "
                                        f"writing it to a file (also {DEBUG_ENV}=1); accepted anywhere on the line")] = False,
    version: Annotated[bool, typer.Option("--version", help="print the version and exit", is_eager=True)] = False,
) -> None:
    """main() reads --debug before typer parses the line."""
    if version:
        from morphcache import __version__

        typer.echo(f"morphcache {__version__}")
        raise typer.Exit(0)


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


def command_name(args: Sequence[str]) -> str:
    """``['store', 'info', 'S']`` -> ``'store info'``; ``['extract', '--data', 'd']`` -> ``'extract'``."""
    if not args or args[0].startswith("-"):
        return "morphcache"
    if args[0] in _GROUPS and len(args) > 1 and not args[1].startswith("-"):
        return f"{args[0]} {args[1]}"
    return args[0]


def _out_dir(args: Sequence[str]) -> Path | None:
    """The run or store directory of this command line (its ``--out``/``-o`` value) when it exists as a folder."""
    for i, a in enumerate(args):
        value = a.split("=", 1)[1] if a.startswith("--out=") else (args[i + 1] if a in ("--out", "-o") and
                                                                     i + 1 < len(args) else None)
        if value is not None and Path(value).expanduser().is_dir():
            return Path(value).expanduser()
    return None


def write_traceback(exc: BaseException, args: Sequence[str]) -> Path | None:
    """Write ``exc``'s full traceback and the command line to ``morphcache-error-<time>-<pid>.log`` in the run or
    store directory (the command's ``--out`` folder when it exists), else in the temp directory. Returns the
    file's path, or None when neither can be written."""
    text = (f"morphcache {' '.join(args)}\n\n"
            + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
    name = f"morphcache-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (_out_dir(args), Path(tempfile.gettempdir())):
        if folder is None:
            continue
        try:
            path = folder / name
            path.write_text(text, encoding="utf-8", errors="backslashreplace")
            return path.resolve()
        except OSError:
            continue
    return None


def _debug_requested(args: list[str]) -> tuple[bool, list[str]]:
    """(--debug given anywhere before ``--`` or MORPHCACHE_DEBUG set, the arguments without --debug)."""
    end = args.index("--") if "--" in args else len(args)
    flag = "--debug" in args[:end]
    rest = [a for i, a in enumerate(args) if not (i < end and a == "--debug")]
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")
    return flag or env, rest


def _click_exception_types() -> tuple[tuple, tuple, tuple]:
    """(Exit, ClickException, Abort) classes of click and of the copy of click that newer typer releases bundle
    (``typer._click``); a usage error raised by either is bad input (exit 2), not an internal error."""
    import click

    modules = [click.exceptions]
    try:
        from typer._click import exceptions as bundled
    except ImportError:  # typer releases that use the click package itself
        bundled = None
    if bundled is not None and bundled is not click.exceptions:
        modules.append(bundled)

    def found(name: str, *extra) -> tuple:
        return tuple(dict.fromkeys([getattr(m, name) for m in modules if hasattr(m, name)] + list(extra)))

    return (found("Exit", typer.Exit), found("ClickException"), found("Abort", typer.Abort))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default: ``sys.argv[1:]``) and return the exit code: 0 done, 1 a check found
    problems or an internal error (one line; the traceback goes to a file), 2 bad input (one line), 130
    interrupted (Ctrl-C), 143 terminated (SIGTERM); both print :data:`INTERRUPTED`."""
    click_exit, click_error, click_abort = _click_exception_types()
    debug, args = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    _TERMINATED.clear()
    previous = _install_sigterm_handler()
    try:
        return _run(args, debug, click_exit, click_error, click_abort)
    except KeyboardInterrupt as exc:  # one arriving while an error above is being reported
        return _interrupted(exc)
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)


def _usage_error_line(exc) -> str:
    """One line for a click usage error (click's own report is a usage block of several lines): the message and
    the command whose --help lists what it takes."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    ctx = getattr(exc, "ctx", None)
    where = f"; see '{ctx.command_path} --help'" if ctx is not None and ctx.command_path else ""
    return f"morphcache: error: {message}{where}"


def _run(args: list[str], debug: bool, click_exit, click_error, click_abort) -> int:
    try:
        result = app(args=args, prog_name="morphcache", standalone_mode=False)
    except MorphcacheError as exc:
        print(f"morphcache: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except click_exit as exc:
        interrupt = _interrupt_in(exc)  # typer: KeyboardInterrupt -> Exit(130), silently
        return _interrupted(interrupt) if interrupt is not None else int(exc.exit_code or 0)
    except click_error as exc:  # usage errors: unknown option or command, a value of the wrong type, no arguments
        print(_usage_error_line(exc), file=sys.stderr)
        return 2
    except click_abort as exc:
        interrupt = _interrupt_in(exc)
        if interrupt is not None:
            return _interrupted(interrupt)
        print("morphcache: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except Exception as exc:  # an internal error: one line here, the traceback in a file (or here with --debug)
        interrupt = _interrupt_in(exc)  # e.g. a loader re-raising the KeyboardInterrupt it caught
        if interrupt is not None:
            return _interrupted(interrupt)
        what = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        cmd = command_name(args)
        cmd = "morphcache" if cmd == "morphcache" else f"morphcache {cmd}"
        if debug:
            traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
            print(f"{cmd}: internal error: {what}", file=sys.stderr)
            return 1
        path = write_traceback(exc, args)
        where = (f"full traceback in {path}" if path is not None else "the traceback could not be written")
        print(f"{cmd}: internal error: {what}; {where} (--debug or {DEBUG_ENV}=1 prints it); "
              "please report it", file=sys.stderr)
        return 1
    if result == INTERRUPTED_BY_TYPER:  # typer catches a KeyboardInterrupt and returns 130 (standalone_mode=False)
        return _interrupted()
    return int(result or 0) if isinstance(result, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
