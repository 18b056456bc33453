"""Worker processes for work bound by system calls: reading, hashing and writing many files.

Adding a tree of many small files, or unpacking a cache's packs into blobs, costs a handful
of system calls per file, each of which releases the GIL and takes it back. Threads then
spend their time handing the GIL to each other: on a two-CPU machine, adding a 50,000-file
tree took 4.9 s with four threads and 3.1 s with none. Forked worker processes share no
GIL, so that work really runs in parallel while the calling process goes on.

Workers are forked, so they inherit the open store and the function they run as they are
(only the work items and results are pickled), and they die with the process that forked
them (``PR_SET_PDEATHSIG``): a killed ``fimio add`` leaves no worker behind holding the
store's locks. What runs in a worker must not use anything the fork did not copy in a
usable state: no threads of the parent (a cache client; blake3's multi-threaded hashing,
hence :func:`hash_threads`), only system calls, zstd and single-threaded hashing.
"""

from __future__ import annotations

import errno
import os

_functions: dict = {}  # pool id -> what its workers call on each item; set before they fork
_in_worker = False


def hash_threads() -> int:
    """``max_threads`` for hashing a large input with blake3: all CPUs, except in a worker,
    where the thread pool blake3 keeps for that (if the parent had started it) did not
    survive the fork -- using it there would wait forever."""
    import blake3

    return 1 if _in_worker else blake3.blake3.AUTO


def _run_batch(pool_id: int, batch: list) -> list:
    """In a worker: ``fn(*item)`` for each item, in order."""
    fn = _functions[pool_id]
    return [fn(*item) for item in batch]


def _die_with_parent(parent: int) -> None:
    """In a new worker: be killed when the forking process dies (and exit if it already has)."""
    import ctypes
    import signal

    global _in_worker
    _in_worker = True

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: an orphaned worker then exits when its queue is closed
    if os.getppid() != parent:
        os._exit(1)


def default_workers() -> int:
    """Two to four: the CPUs this process may use."""
    return min(4, max(2, len(os.sched_getaffinity(0))))


class ForkPool:
    """``workers`` forked processes that run ``fn(*item)``: ``submit(items)`` returns a
    future of the list of results (the error a worker raised is raised by its
    ``result()``). Use as a context manager: leaving it stops the workers, dropping what
    is still queued."""

    def __init__(self, fn, workers: int | None = None):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        self._id = id(self)
        _functions[self._id] = fn
        # "fork": the workers inherit fn (and the store it uses) as they are
        self._pool = ProcessPoolExecutor(workers or default_workers(),
                                         mp_context=multiprocessing.get_context("fork"),
                                         initializer=_die_with_parent, initargs=(os.getpid(),))
        try:
            # fork now, from this thread: the workers' death signal follows the thread
            # that forked them, which must not be a short-lived one
            self._pool.submit(_run_batch, self._id, [])
        except OSError:
            # no process to be had (a process limit, no memory): the work is done here
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def submit(self, items: list):
        if self._pool is not None:
            return self._pool.submit(_run_batch, self._id, items)
        from concurrent.futures import Future

        done: Future = Future()
        try:
            done.set_result(_run_batch(self._id, items))
        except Exception as e:  # noqa: BLE001 -- raised by result(), as from a worker
            done.set_exception(e)
        return done

    def __enter__(self) -> "ForkPool":
        return self

    def __exit__(self, kind, value, tb) -> None:
        from concurrent.futures.process import BrokenProcessPool

        try:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
        finally:
            del _functions[self._id]
        if isinstance(value, BrokenProcessPool):
            # a worker was killed (out of memory?): an error like any failed system call
            raise OSError(errno.ECHILD, "a worker process died unexpectedly (killed? out of memory?)") from None
