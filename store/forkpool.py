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

The pool is a small one over pipes rather than ``concurrent.futures``'
``ProcessPoolExecutor``: importing that and ``multiprocessing`` took 20 ms and starting its
workers 10 ms more, a sixth of a whole ``fimio add`` of a 77 MB tree. Each worker has a
feeding thread in the caller that hands it one batch at a time from a shared queue, so
the work balances itself; a batch and its answer are pickled, length-prefixed messages.
"""

from __future__ import annotations

import collections
import errno
import os
import pickle
import signal
import struct
import threading

from .fsutil import write_all

_in_worker = False
_pipe_ends: set[int] = set()  # the caller's ends of every pool's pipes, which a new worker closes
_fork_lock = threading.Lock()  # guards forks and _pipe_ends (a worker must inherit a settled set)
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
    the batch raised); ``add_done_callback(fn)`` calls ``fn(future)`` once it is done (an
    error a callback raises is printed, as ``concurrent.futures`` logs it, not raised)."""

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
            self._call(fn)

    def add_done_callback(self, fn) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        self._call(fn)

    def _call(self, fn) -> None:
        try:
            fn(self)
        except Exception:  # noqa: BLE001 -- a bug of the callback, which must not stop the pool
            import traceback

            traceback.print_exc()

    def result(self):
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


class _Worker:
    """A forked worker process and the caller's ends of its two pipes."""

    def __init__(self, pid: int, tasks: int, answers: int):
        self.pid, self.tasks, self.answers = pid, tasks, answers

    def close_pipes(self) -> None:
        """Close the caller's ends: the worker reads the end of its input, and exits."""
        with _fork_lock:
            _pipe_ends.difference_update((self.tasks, self.answers))
            os.close(self.tasks)
            os.close(self.answers)


class ForkPool:
    """``workers`` forked processes that run ``fn(*item)``: ``submit(items)`` returns a
    future of the list of results (the error a worker raised is raised by its
    ``result()``). Use as a context manager: leaving it normally waits for what was
    submitted; leaving it by an exception drops what is still queued and kills the
    workers; submitting afterwards raises RuntimeError.

    Create it on a thread that outlives it: workers die with the thread that forked them
    (``PR_SET_PDEATHSIG``). Without any process to be had, the work runs in the caller."""

    def __init__(self, fn, workers: int | None = None):
        self._fn = fn
        self._jobs: collections.deque = collections.deque()  # (future, items); None stops a feeder
        self._jobs_ready = threading.Condition()
        self._workers: list[_Worker] = []
        self._feeders: list[threading.Thread] = []
        self._failure: BaseException | None = None  # once set, every batch not yet sent fails with it
        self._closed = False
        self._closing = threading.Lock()
        try:
            # all workers forked before any feeder starts: a fork copies this process
            # with fewer threads in it
            try:
                for _ in range(workers or default_workers()):
                    self._workers.append(self._fork())
            except OSError:
                pass  # no process to be had (a process limit, no memory): fewer workers, or none
            for worker in list(self._workers):
                self._start_feeder(worker)
        except BaseException:  # a Ctrl-C: leave no worker behind
            self._stop(killing=True)
            raise

    def _fork(self) -> _Worker:
        # Ctrl-C held back from before the fork until the new worker ignores it: raised in
        # the child before that, it would unwind the child into the caller's code.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            with _fork_lock:
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
                    try:
                        signal.signal(signal.SIGINT, signal.SIG_IGN)
                        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                        _worker_main(self._fn, tasks_r, answers_w, _pipe_ends | {tasks_w, answers_r}, parent)
                    finally:
                        os._exit(1)
                os.close(tasks_r)
                os.close(answers_w)
                _pipe_ends.update((tasks_w, answers_r))
                return _Worker(pid, tasks_w, answers_r)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)

    def _start_feeder(self, worker: _Worker) -> None:
        feeder = threading.Thread(target=self._feed, args=(worker,), daemon=True)
        try:
            feeder.start()
        except RuntimeError:  # "can't start new thread": the limits that fail a fork
            self._workers.remove(worker)
            worker.close_pipes()
            os.waitpid(worker.pid, 0)
            return
        self._feeders.append(feeder)

    def _feed(self, worker: _Worker) -> None:
        """On a feeding thread: hand queued batches to one worker, one at a time, and
        finish their futures with its answers. Every future taken is finished."""
        try:
            while (job := self._next_job()) is not None:
                future, items = job
                try:
                    ok, value = self._ask(worker, items)
                except BaseException as e:  # noqa: BLE001 -- raised by result()
                    ok, value = False, e
                if ok:
                    future.finish(value)
                else:
                    future.finish(error=value)
        finally:
            worker.close_pipes()

    def _put(self, job, first: bool = False) -> None:
        with self._jobs_ready:
            (self._jobs.appendleft if first else self._jobs.append)(job)
            self._jobs_ready.notify()

    def _next_job(self):
        with self._jobs_ready:
            while not self._jobs:
                self._jobs_ready.wait()
            return self._jobs.popleft()

    def _ask(self, worker: _Worker, items: list) -> tuple[bool, object]:
        """``(True, results)`` or ``(False, error)`` of one batch run by ``worker``."""
        if self._failure is not None:
            return False, self._failure
        message = _encode(items)  # an item that cannot be pickled fails its own batch only
        try:
            _send(worker.tasks, message)
            answer = _receive(worker.answers)
        except OSError:  # EPIPE: the worker is gone
            answer = None
        if answer is None:
            self._failure = self._failure or _worker_died()
            return False, self._failure
        return pickle.loads(answer)

    def submit(self, items: list, first: bool = False) -> _Future:
        """Queue a batch; ``first``: ahead of every batch still queued (a long one, so
        that it does not start last and leave the other workers idle at the end)."""
        future = _Future()
        with self._closing:
            if self._closed:
                raise RuntimeError("the worker pool was already left")
            if self._feeders:
                self._put((future, items), first)
                return future
        try:
            future.finish(_run_batch(self._fn, items))
        except Exception as e:  # noqa: BLE001 -- raised by result(), as from a worker
            future.finish(error=e)
        return future

    def __enter__(self) -> "ForkPool":
        return self

    def __exit__(self, kind, value, tb) -> None:
        self._stop(killing=kind is not None)

    def _stop(self, killing: bool) -> None:
        with self._closing:
            self._closed = True
        try:
            if killing:
                self._kill()
            for _ in self._feeders:
                self._put(None)
            for feeder in self._feeders:
                feeder.join()
        except BaseException:  # a Ctrl-C while waiting for the last batches
            self._kill()
            raise
        finally:
            self._feeders = []
            for worker in self._workers:
                os.waitpid(worker.pid, 0)
            self._workers = []

    def _kill(self) -> None:
        """Drop what is queued and stop the workers where they are."""
        self._failure = self._failure or RuntimeError("the work was dropped: its worker pool was left by an error")
        for worker in self._workers:
            os.kill(worker.pid, signal.SIGKILL)  # not yet reaped, so the pid is still this worker's


def _run_batch(fn, items: list) -> list:
    return [fn(*item) for item in items]


def _encode(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _send(fd: int, message: bytes) -> None:
    write_all(fd, _HEADER.pack(len(message)))
    write_all(fd, message)


def _receive(fd: int) -> bytearray | None:
    """The next message on ``fd`` (a pickle), or None at its end (the other side closed
    it, or died)."""
    header = _read_exactly(fd, _HEADER.size)
    return None if header is None else _read_exactly(fd, _HEADER.unpack(header)[0])


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
        while (message := _receive(tasks)) is not None:
            try:
                answer = _encode((True, _run_batch(fn, pickle.loads(message))))
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
    has). Ctrl-C is left to the caller, which kills its workers when it stops."""
    import ctypes

    global _in_worker
    _in_worker = True
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: an orphaned worker then exits when its input is closed
    if os.getppid() != parent:
        os._exit(1)
