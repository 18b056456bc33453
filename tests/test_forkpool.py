"""The worker-process pool (store/forkpool.py): results in order, errors as raised, dead
workers and interrupted callers handled, and no process left behind."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from fimio.store import forkpool
from fimio.store.errors import IntegrityError


def _double(x):
    return x * 2


def _pid_and(x):
    return os.getpid(), x


def _children() -> set[int]:
    """The live (not zombie) children of this process."""
    with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
        pids = {int(p) for p in f.read().split()}
    return {p for p in pids if _state(p) not in ("Z", None)}


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_results_come_back_in_order_from_worker_processes():
    before = _children()
    with forkpool.ForkPool(_pid_and, workers=2) as pool:
        workers = _children() - before
        futures = [pool.submit([(i,), (i + 1000,)]) for i in range(200)]
        results = [f.result() for f in futures]
    assert len(workers) == 2
    assert [[x for _, x in r] for r in results] == [[i, i + 1000] for i in range(200)]
    assert {pid for r in results for pid, _ in r} <= workers  # none ran in the caller
    assert _children() == before  # every worker has exited and been reaped



def _stamp(x, running_marker=None):
    started = time.monotonic()
    if running_marker is not None:
        open(running_marker, "w").close()
        time.sleep(0.3)  # long enough for the later batches to be queued behind it
    return x, started


def test_a_batch_submitted_first_runs_before_those_queued_earlier(tmp_path):
    marker = tmp_path / "running"
    with forkpool.ForkPool(_stamp, workers=1) as pool:
        running = pool.submit([(0, str(marker))])
        while not marker.exists():
            time.sleep(0.01)
        queued = [pool.submit([(i,)]) for i in (1, 2)]
        urgent = pool.submit([(3,)], first=True)
        started = {x: t for f in (running, *queued, urgent) for x, t in f.result()}
    assert started[0] < started[3] < started[1] < started[2]

def test_large_items_and_concurrent_submitters_keep_each_result_with_its_batch():
    big = os.urandom(3 << 20)  # larger than the pipes: sends block until the worker reads
    out: dict[int, list] = {}

    with forkpool.ForkPool(_double, workers=2) as pool:
        def submitter(k: int) -> None:
            out[k] = [pool.submit([(big[:k],), (k,)]).result() for _ in range(5)]

        threads = [threading.Thread(target=submitter, args=(k,)) for k in range(1, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for k, results in out.items():
        assert results == [[big[:k] * 2, 2 * k]] * 5


def _fail_on(x):
    if x == 3:
        raise IntegrityError(f"item {x} is bad", "a hint")
    return x


def test_an_error_in_a_worker_is_raised_by_result_with_its_type_and_text():
    with forkpool.ForkPool(_fail_on, workers=2) as pool:
        good, bad = pool.submit([(1,), (2,)]), pool.submit([(3,)])
        assert good.result() == [1, 2]
        with pytest.raises(IntegrityError) as e:
            bad.result()
        assert e.value.message == "item 3 is bad" and e.value.hint == "a hint"
        assert pool.submit([(4,)]).result() == [4]  # the worker lives on


def _die_on(x):
    if x == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def test_a_killed_worker_is_an_oserror_not_a_hang():
    with pytest.raises(OSError) as e:
        with forkpool.ForkPool(_die_on, workers=2) as pool:
            pool.submit([(1,)]).result()
            pool.submit([("die",)]).result()
    assert e.value.errno == errno.ECHILD


def _nap(path):
    time.sleep(0.05)
    with open(path, "a") as f:
        f.write("x")


def test_leaving_by_an_exception_drops_the_queued_work_and_leaves_no_worker(tmp_path):
    before = _children()
    done = tmp_path / "done"
    with pytest.raises(KeyError):
        with forkpool.ForkPool(_nap, workers=2) as pool:
            for _ in range(100):
                pool.submit([(str(done),)])
            raise KeyError("interrupted")
    ran = len(done.read_text()) if done.exists() else 0
    assert ran < 100  # what no worker had started was dropped (5 s of work otherwise)
    assert _children() == before


def test_without_processes_the_work_runs_in_the_caller(monkeypatch):
    def no_fork():
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", no_fork)
    with forkpool.ForkPool(_pid_and, workers=2) as pool:
        assert pool.submit([(7,)]).result() == [(os.getpid(), 7)]
        with pytest.raises(IntegrityError):
            forkpool.ForkPool(_fail_on).submit([(3,)]).result()


def test_a_worker_hashes_on_one_thread():
    with forkpool.ForkPool(lambda: forkpool.hash_threads(), workers=2) as pool:
        assert pool.submit([()]).result() == [1]
    assert forkpool.hash_threads() != 1


def test_a_pool_that_got_fewer_processes_than_asked_works_with_those(monkeypatch):
    real_fork, forks = os.fork, []

    def fork_once():
        if forks:
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")
        forks.append(1)
        return real_fork()

    monkeypatch.setattr(os, "fork", fork_once)
    with forkpool.ForkPool(_pid_and, workers=3) as pool:
        results = [pool.submit([(i,)]) for i in range(20)]
        pids = {pid for f in results for pid, _ in f.result()}
    assert len(pids) == 1 and os.getpid() not in pids


def test_starting_a_pool_imports_neither_multiprocessing_nor_concurrent_futures():
    # Both cost 20-30 ms to import: a sixth of a small `fimio add`, which starts a pool.
    code = ("import sys; from fimio.store import forkpool\n"
            "with forkpool.ForkPool(abs, workers=2) as pool: assert pool.submit([(-1,)]).result() == [1]\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('multiprocessing', 'concurrent')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class _NoUnpickling(Exception):
    def __init__(self, path, why):  # pickled by its message alone: unpickling calls __init__(message)
        super().__init__(f"{path}: {why}")


def _raise_unloadable(x):
    raise _NoUnpickling("p", "why")


def test_an_answer_that_cannot_be_read_is_an_error_of_its_batch_not_a_hang():
    with forkpool.ForkPool(_raise_unloadable, workers=1) as pool:
        with pytest.raises(TypeError):
            pool.submit([(1,)]).result()
        with pytest.raises(TypeError):
            pool.submit([(2,)]).result()  # the pool still answers


def test_a_callback_that_raises_is_reported_and_stops_nothing(capsys):
    calls = []

    def bad(future):
        calls.append("bad")
        raise BrokenPipeError("a progress line to a closed terminal")

    with forkpool.ForkPool(_double, workers=1) as pool:
        futures = [pool.submit([(i,)]) for i in range(4)]
        for f in futures:
            f.add_done_callback(bad)
            f.add_done_callback(lambda f: calls.append("good"))
        assert [f.result() for f in futures] == [[0], [2], [4], [6]]
    assert calls.count("good") == 4 and calls.count("bad") == 4
    assert "a progress line to a closed terminal" in capsys.readouterr().err


def test_submitting_to_a_pool_already_left_raises_instead_of_waiting_forever():
    with forkpool.ForkPool(_double, workers=1) as pool:
        pass
    with pytest.raises(RuntimeError):
        pool.submit([(1,)])


def test_a_worker_whose_feeding_thread_cannot_start_is_not_left_behind(monkeypatch):
    before = _children()
    real_start, starts = threading.Thread.start, []

    def start_once(thread):
        if starts:
            raise RuntimeError("can't start new thread")
        starts.append(thread)
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start_once)
    with forkpool.ForkPool(_pid_and, workers=2) as pool:
        assert len(_children() - before) == 1  # the other worker was stopped and reaped
        pids = {pid for f in [pool.submit([(i,)]) for i in range(10)] for pid, _ in f.result()}
    assert len(pids) == 1 and os.getpid() not in pids
    assert _children() == before
