"""Progress lines on stderr, shown only when it is a terminal (never on a pipe, in a log
file or with -q), redrawn at most ten times a second and erased when the work ends, so
that what remains on the screen is the command's own result."""

from __future__ import annotations

import sys
import threading
import time

from .render import human_size

_INTERVAL = 0.1  # seconds between redraws


def _on_terminal(opts) -> bool:
    return sys.stderr.isatty() and opts.verbosity >= 0


class _Line:
    """The one status line: drawn over itself, at most every ``_INTERVAL`` through
    :meth:`redraw`, from any thread."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.shown = False
        self.last = 0.0
        self.lock = threading.Lock()

    def show(self, text: str) -> None:
        """Draw ``text`` now (call with the lock held)."""
        sys.stderr.write("\r\033[K" + text[:160])
        sys.stderr.flush()
        self.shown = True

    def redraw(self, text: str) -> None:
        """Draw ``text`` unless the line was drawn less than ``_INTERVAL`` ago (or is off)."""
        with self.lock:
            now = time.monotonic()
            if self.enabled and now - self.last >= _INTERVAL:
                self.last = now
                self.show(text)

    def clear(self) -> None:
        with self.lock:
            if self.shown:
                sys.stderr.write("\r\033[K")
                sys.stderr.flush()
                self.shown = False


def _bar(label: str, done: int, total: int | None) -> str:
    if not total:
        return f"{label} {human_size(done)}"
    pct = min(100, 100 * done // total)
    return f"{label} [{'#' * (pct // 4):<25}] {pct:3d}% {human_size(done)} / {human_size(total)}"


class ByteProgress(_Line):
    """Work measured in bytes: ``progress(done, total)`` draws ``label [####   ] 40% 12 MiB / 30 MiB``,
    or ``label 12 MiB`` when the total is unknown (None). Safe to call from several threads."""

    def __init__(self, opts, label: str):
        super().__init__(_on_terminal(opts))
        self.label = label

    def __call__(self, done: int, total: int | None = None) -> None:
        if self.enabled:
            self.redraw(_bar(self.label, done, total))

    def done(self) -> None:
        with self.lock:
            self.enabled = False  # a worker thread still reporting draws nothing more
        self.clear()


class BuildProgress(_Line):
    """A realise: ``progress(event, drv, counts)`` with event "start" or "done" draws
    ``[3/10 built, 2 running] name, name``. Shown only on a terminal, without -q or -v (the
    build logs that -v streams would be torn by it)."""

    def __init__(self, opts):
        super().__init__(_on_terminal(opts) and opts.verbosity < 1)
        self.running: dict[str, str] = {}

    def __call__(self, event, drv, counts) -> None:
        if not self.enabled:
            return
        with self.lock:
            if event == "start":
                self.running[drv.drv_path.base] = drv.name
            else:
                self.running.pop(drv.drv_path.base, None)
            names = ", ".join(list(self.running.values())[:3])
            self.show(f"[{counts['done']}/{counts['total']} built, {len(self.running)} running] {names}")

    def substituting(self, done: int, total: int) -> None:
        """Substitution's ``FetchStats.progress``: bytes of content fetched so far."""
        self.redraw(_bar("substituting", done, total))
