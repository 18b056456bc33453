"""Thread pools for network and file work that a Ctrl-C does not wait for.

``concurrent.futures.ThreadPoolExecutor`` used as a context manager waits for every task
when it is left, and so does the interpreter at exit. A task blocked in a download from a
stalled server would then hold a Ctrl-C'd ``fimio copy`` for the minutes of its timeout.
:class:`ThreadPool` left by ``KeyboardInterrupt`` cancels what has not started and returns
at once; ``fimio.cli.main`` then ends the process without waiting for the tasks still
running. What they leave under ``tmp/`` belongs to a dead process and is removed by the
next command that opens the store (``recovery.py``); nothing they do is ever registered,
because registration happens on the thread that was interrupted.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor


class ThreadPool(ThreadPoolExecutor):
    def __exit__(self, exc_type, exc, tb):
        self.close(interrupted=isinstance(exc, KeyboardInterrupt))
        return False

    def close(self, interrupted: bool = False) -> None:
        """Wait for every task, or, ``interrupted``, only cancel those not yet started."""
        self.shutdown(wait=not interrupted, cancel_futures=interrupted)
