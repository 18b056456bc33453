"""fimio.cli: the command-line front end (a thin layer over fimio.store)."""

from __future__ import annotations

import errno
import gc
import os
import sys


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``fimio`` console script: run a command, map errors to exit codes."""
    try:
        _open_standard_streams()
        code = run(argv)
    except KeyboardInterrupt:  # during start-up, before run's own handlers are in place
        _fail("interrupted")
        code = 130
    # At exit the interpreter collects cycles once more, even with the collector disabled,
    # walking every object still alive (10-20 ms of a 150 ms command). Nothing found then
    # would be freed sooner than by the process's end: frozen objects are not walked.
    gc.freeze()
    if code == 130:
        # Interrupted: worker threads may still be blocked in network I/O, and a normal exit
        # would wait for them (see fimio.store.threadpool). The store needs nothing of them.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    sys.exit(code)


def _open_standard_streams() -> None:
    """Put /dev/null on a closed stdin, stdout or stderr, so that no file fimio opens lands
    on fd 0-2 (results and messages would be written into it, or mixed up), and Python has
    streams to use. A closed stdout is said once: what fimio prints there is lost."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free fd: this one, as 0-2 go in order
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if 0 in closed:
        sys.stdin = open(0, closefd=False)
    if 1 in closed:
        sys.stdout = open(1, "w", closefd=False)
    if 2 in closed:
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")
    if 1 in closed:
        print("fimio: warning: standard output is closed: what fimio prints there is lost", file=sys.stderr)


def run(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "serve":
        # A command is one short process holding large acyclic structures (trees of 50k
        # entries): the cycle collector would walk them again and again (8% of an export)
        # and find nothing to free. The long-running server keeps it.
        gc.disable()
    from fimio.store.errors import FimioError

    try:
        return _dispatch(args, argv)
    except FimioError as e:
        for line in e.details:
            print(f"  {line}", file=sys.stderr)
        _fail(e.message, e.hint)
        return e.exit_code
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except BrokenPipeError:
        # the reader went away (e.g. `fimio dump P | head`): not an error worth a message
        sys.stderr.close()
        return 1
    except OSError as e:
        if os.environ.get("FIMIO_DEBUG") == "1":
            raise
        if e.errno == errno.ECHILD:  # a worker process died: its message says what to suspect
            _fail(f"{e.strerror or e}")
        elif isinstance(e, PermissionError) and e.filename and _in_an_opened_store(e.filename):
            # store files are the store's own, read-only for all: one that cannot be read
            # had its mode changed by hand
            _fail(f"cannot read '{os.fsdecode(e.filename)}' in the store: {e.strerror}",
                  "its mode was changed; 'fimio verify --check-contents' lists the damage")
            return 4
        elif e.filename:  # the file system in trouble is the one of the file named
            _fail(f"{e.strerror or e} '{os.fsdecode(e.filename)}'", "check free space and permissions there")
        else:
            _fail(f"{e.strerror or e}", "check free space and permissions of the store root and of any target")
        return 1


def _in_an_opened_store(filename) -> bool:
    from .options import opened_stores

    name = os.path.abspath(os.fsdecode(filename))
    return any(name.startswith(store + "/") for store in opened_stores)


def _dispatch(args: list[str], argv: list[str] | None) -> int:
    """Run the command: through a fast path without click where one applies (see
    :mod:`fimio.cli.fast`), else through click. Errors other than click's propagate."""
    if args and args[0] in ("add", "realise"):
        from . import fast

        code = (fast.try_add if args[0] == "add" else fast.try_realise)(args)
        if code is not None:
            return code
    import click

    from .main import cli

    try:
        result = cli.main(args=argv, prog_name="fimio", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.Abort:
        _fail("interrupted")
        return 130
    except click.ClickException as e:
        if type(e).__name__ == "NoArgsIsHelpError" and e.ctx is not None:
            # `fimio` or `fimio key` alone (click >= 8.2): the help, not an error line holding it
            print(e.ctx.get_help(), file=sys.stderr)
            return 2
        if isinstance(e, click.UsageError) and e.ctx is not None:
            # click's "No such option '--chek'. (Did you mean '--check'?)": one what, one hint
            text = e.format_message().replace(". Did you mean ", " (Did you mean ", 1)
            what, _, guess = text.partition(" (Did you mean")
            guess = f"did you mean{guess.removesuffix(')')} " if guess else ""
            _fail(what.rstrip("."), f"{guess}see '{e.ctx.command_path} --help'")
        else:
            _fail(e.format_message())
        return 2


def _fail(what: str, hint: str | None = None) -> None:
    if os.environ.get("FIMIO_DEBUG") == "1" and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    line = f"fimio: error: {what}" + (f" ({hint})" if hint else "")
    # one line whatever it quotes: a newline becomes a space, another control character (a
    # NUL in a name) its escape
    line = line.replace("\n", " ").translate(_CONTROL_ESCAPES)
    try:  # a file name that is not UTF-8 (held as surrogate escapes) shows its bytes, as \xe9
        line = line.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        pass  # another lone surrogate: stderr escapes it
    print(line, file=sys.stderr)


_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F] if c != 0x0A}
