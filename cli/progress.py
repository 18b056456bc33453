"""Progress lines on stderr, shown only when it is a terminal (never on a pipe, in a log
file or with -q), redrawn at most ten times a second and erased when the work ends, so
that what remains on the screen is the command's own result."""

from __future__ import annotations

import os
import sys
import threading
import time

from .render import human_size

_INTERVAL = 0.1  # seconds between redraws
_active: list = []  # the status lines that may be on screen (one, in practice)


def say(text: str) -> None:
    """Print a message line on stderr: above the status line if one is drawn (it is drawn
    again at its next update), so that the message does not end up glued to a bar."""
    import click

    line = _active[-1] if _active else None
    if line is None:
        click.echo(text, file=sys.stderr)
        return
    with line.lock:
        if line.shown:
            line._write("\r\033[K")
        click.echo(text, file=sys.stderr)
        line.shown, line.last = False, 0.0


def _terminal_width(opts) -> int:
    """The width of the terminal stderr is, or 0 when it is none (or -q was given)."""
    if opts.verbosity < 0:
        return 0
    try:
        if not sys.stderr.isatty():
            return 0
        return os.get_terminal_size(sys.stderr.fileno()).columns or 80  # 0: size never set
    except (AttributeError, OSError, ValueError):  # no stderr at all, or not a real file
        return 0


class _Line:
    """The one status line: drawn over itself, at most every ``_INTERVAL`` through
    :meth:`redraw`, from any thread; never wider than the terminal (a wrapped line could
    not be erased). A write that fails turns it off rather than fail the work."""

    def __init__(self, width: int):
        self.enabled = width > 0
        self.width = max(width - 1, 20)
        self.shown = False
        self.last = 0.0
        self.lock = threading.Lock()
        if self.enabled:
            _active.append(self)

    @property
    def callback(self):
        """This object where work should report to it, None where it shows nothing."""
        return self if self.enabled else None

    def show(self, text: str) -> None:
        """Draw ``text`` now (call with the lock held)."""
        self._write("\r\033[K" + text[:self.width])
        self.shown = self.enabled

    def redraw(self, text: str) -> None:
        """Draw ``text`` unless the line was drawn less than ``_INTERVAL`` ago (or is off)."""
        with self.lock:
            now = time.monotonic()
            if self.enabled and now - self.last >= _INTERVAL:
                self.last = now
                self.show(text)

    def done(self) -> None:
        """Erase the line for good: a worker thread still reporting draws nothing more."""
        with self.lock:
            if self.shown:
                self._write("\r\033[K")
            self.enabled = self.shown = False
        if self in _active:
            _active.remove(self)

    def _write(self, text: str) -> None:
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except (OSError, ValueError):  # the terminal went away
            self.enabled = False


def _bar(label: str, done: int, total: int | None, width: int) -> str:
    """``label [####   ] 40% 12 MiB / 30 MiB``, the label shortened to fit ``width``."""
    if total:
        pct = min(100, 100 * done // total)
        tail = f" [{'#' * (pct // 4):<25}] {pct:3d}% {human_size(done)} / {human_size(total)}"
    else:
        tail = f" {human_size(done)}"
    room = width - len(tail)
    if len(label) > room:
        label = label[:max(room - 1, 0)] + "…"
    return label + tail


class ByteProgress(_Line):
    """Work measured in bytes: ``progress(done, total)`` draws ``label [####   ] 40% 12 MiB / 30 MiB``,
    or ``label 12 MiB`` when the total is unknown (None). Safe to call from several threads."""

    def __init__(self, opts, label: str):
        super().__init__(_terminal_width(opts))
        self.label = label

    def __call__(self, done: int, total: int | None = None) -> None:
        self.redraw(_bar(self.label, done, total, self.width))


class BuildProgress(_Line):
    """A realise: ``progress(event, drv, counts)`` with event "start", "done" or "failed"
    draws ``[3/10 built, 1 failed, 2 running] name, name``. Shown only on a terminal,
    without -q or -v (the build logs that -v streams would be torn by it)."""

    def __init__(self, opts):
        super().__init__(_terminal_width(opts) if opts.verbosity < 1 else 0)
        self.running: dict[str, str] = {}

    def __call__(self, event, drv, counts) -> None:
        with self.lock:
            if not self.enabled:
                return
            if event == "start":
                self.running[drv.drv_path.base] = drv.name
            else:
                self.running.pop(drv.drv_path.base, None)
            names = ", ".join(list(self.running.values())[:3])
            failed = f", {counts['failed']} failed" if counts.get("failed") else ""
            self.show(f"[{counts['done']}/{counts['total']} built{failed}, {len(self.running)} running] {names}")

    def substituting(self, done: int, total: int) -> None:
        """Substitution's ``FetchStats.progress``: bytes of content fetched so far."""
        self.redraw(_bar("substituting", done, total, self.width))
