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

The pool is a few dozen lines over pipes rather than ``concurrent.futures``'
``ProcessPoolExecutor``: importing that and ``multiprocessing`` took 20 ms and starting its
workers 10 ms more, a sixth of a whole ``fimio add`` of a 77 MB tree. Each worker has a
feeding thread in the caller that hands it one batch at a time from a shared queue, so
the work balances itself; a batch and its answer are pickled, length-prefixed messages.
"""

from __future__ import annotations

import errno
import os
import pickle
import queue
import signal
import struct
import threading

from .fsutil import write_all

_in_worker = False
_pipe_ends: set[int] = set()  # the caller's ends of every pool's pipes, which a new worker closes
_forking = threading.Lock()
_HEADER = struct.Struct("<Q")  # a message: its length, then a pickle


def hash_threads() -> int:
    """``max_threads`` for hashing a large input with blake3: all CPUs, except in a worker,
    where the thread pool blake3 keeps for that (if the parent had started it) did not
    survive the fork -- using it there would wait forever."""
    import blake3

    return 1 if _in_worker else blake3.blake3.AUTO


def default_workers() -> int:
    """Two to four: the CPUs this process may use."""
    return min(4, max(2, len(os.sched_getaffinity(0))))


def _worker_died() -> OSError:
    return OSError(errno.ECHILD, "a worker process died unexpectedly (killed? out of memory?)")


class _Future:
    """The answer to one submitted batch: ``result()`` waits for it (and raises the error
    the batch raised); ``add_done_callback(fn)`` calls ``fn(future)`` once it is done."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list = []
        self._value = None
        self._error: BaseException | None = None

    def finish(self, value=None, error: BaseException | None = None) -> None:
        with self._lock:
            self._value, self._error = value, error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def add_done_callback(self, fn) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class ForkPool:
    """``workers`` forked processes that run ``fn(*item)``: ``submit(items)`` returns a
    future of the list of results (the error a worker raised is raised by its
    ``result()``). Use as a context manager: leaving it normally waits for what was
    submitted; leaving it by an exception drops what is still queued and kills the workers."""

    def __init__(self, fn, workers: int | None = None):
        self._fn = fn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pids: list[int] = []
        self._feeders: list[threading.Thread] = []
        self._failure: OSError | None = None  # once a worker has died, every batch fails
        self._dropping = False
        try:
            for _ in range(workers or default_workers()):
                self._start_worker()
        except OSError:
            pass  # no process to be had (a process limit, no memory): fewer workers, or none

    def _start_worker(self) -> None:
        with _forking:
            tasks_r, tasks_w = os.pipe()
            answers_r, answers_w = os.pipe()
            parent = os.getpid()
            try:
                pid = os.fork()
            except OSError:
                for fd in (tasks_r, tasks_w, answers_r, answers_w):
                    os.close(fd)
                raise
            if pid == 0:
                _worker_main(self._fn, tasks_r, answers_w, _pipe_ends | {tasks_w, answers_r}, parent)
            os.close(tasks_r)
            os.close(answers_w)
            _pipe_ends.update((tasks_w, answers_r))
        self._pids.append(pid)
        # forked first, then the feeder started: a worker is forked by the caller's thread,
        # whose death (not a feeder's) is what its death signal follows
        feeder = threading.Thread(target=self._feed, args=(tasks_w, answers_r), daemon=True)
        feeder.start()
        self._feeders.append(feeder)

    def _feed(self, tasks: int, answers: int) -> None:
        """On a feeding thread: hand queued batches to one worker, one at a time, and
        finish their futures with its answers."""
        try:
            while (job := self._queue.get()) is not None:
                future, items = job
                if self._dropping or self._failure is not None:
                    future.finish(error=self._failure or _worker_died())
                    continue
                try:
                    message = _encode(items)
                except Exception as e:  # noqa: BLE001 -- an item that cannot be sent
                    future.finish(error=e)
                    continue
                try:
                    _send(tasks, message)
                    answer = _receive(answers)
                except OSError:  # EPIPE: the worker is gone
                    answer = None
                if answer is None:
                    self._failure = self._failure or _worker_died()
                    future.finish(error=self._failure)
                else:
                    ok, value = answer
                    future.finish(value, None) if ok else future.finish(None, value)
        finally:
            with _forking:
                _pipe_ends.difference_update((tasks, answers))
                os.close(tasks)  # the worker reads the end of its input, and exits
                os.close(answers)

    def submit(self, items: list) -> _Future:
        future = _Future()
        if self._feeders:
            self._queue.put((future, items))
            return future
        try:
            future.finish(_run_batch(self._fn, items))
        except Exception as e:  # noqa: BLE001 -- raised by result(), as from a worker
            future.finish(error=e)
        return future

    def __enter__(self) -> "ForkPool":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self._dropping = True
            for pid in self._pids:
                os.kill(pid, signal.SIGKILL)  # not yet reaped, so the pid is still this worker's
        for _ in self._feeders:
            self._queue.put(None)
        for feeder in self._feeders:
            feeder.join()
        for pid in self._pids:
            os.waitpid(pid, 0)


def _run_batch(fn, items: list) -> list:
    return [fn(*item) for item in items]


def _encode(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _send(fd: int, message: bytes) -> None:
    write_all(fd, _HEADER.pack(len(message)))
    write_all(fd, message)


def _receive(fd: int):
    """The next message on ``fd``, or None at its end (the other side closed it, or died)."""
    header = _read_exactly(fd, _HEADER.size)
    if header is None:
        return None
    body = _read_exactly(fd, _HEADER.unpack(header)[0])
    return None if body is None else pickle.loads(body)


def _read_exactly(fd: int, n: int) -> bytearray | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = os.readv(fd, [view[got:]])
        if k == 0:
            return None
        got += k
    return buf


def _worker_main(fn, tasks: int, answers: int, foreign: set[int], parent: int) -> None:
    """A forked worker's whole life: answer each batch read from ``tasks`` on ``answers``
    until the caller closes ``tasks``; never returns into the caller's code."""
    code = 1
    try:
        for fd in foreign:  # other workers' pipes: holding them would keep those open
            os.close(fd)
        _become_worker(parent)
        while (items := _receive(tasks)) is not None:
            try:
                answer = _encode((True, _run_batch(fn, items)))
            except Exception as e:  # noqa: BLE001 -- sent to the caller, raised there
                answer = _encode_error(e)
            _send(answers, answer)
        code = 0
    finally:
        os._exit(code)


def _encode_error(e: Exception) -> bytes:
    try:
        return _encode((False, e))
    except Exception:  # noqa: BLE001 -- an exception that cannot be pickled
        return _encode((False, RuntimeError(f"{type(e).__name__}: {e}")))


def _become_worker(parent: int) -> None:
    """In a new worker: be killed when the forking process dies (and exit if it already
    has); leave Ctrl-C to the caller, which kills its workers when it stops."""
    import ctypes

    global _in_worker
    _in_worker = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: an orphaned worker then exits when its input is closed
    if os.getppid() != parent:
        os._exit(1)
