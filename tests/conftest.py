"""Shared fixtures: a library store, and the real ``fimio`` console script.

* ``store``: a :class:`LocalStore` rooted at ``tmp_path / "root"`` with logical store
  directory ``/fimio/store``; closed after the test.
* ``run_fimio(args, root, input=None, check=None, env=None, text=True)``: run the installed
  console script as a subprocess with ``FIMIO_ROOT=root`` and ``FIMIO_CONFIG`` pointing to
  a file that does not exist (so the user's config never leaks in). Also a fixture,
  ``fimio``, for tests that want several roots.
* ``cli``: ``run_fimio`` bound to ``tmp_path / "root"`` — the same root as ``store``, so a
  test can set up state with the library and look at it through the command line
  (``cli("add", path, check=0)``; ``cli.root``; ``cli.physical_store``).

``check``: None = do not look at the exit code; True/0 = must succeed; an int = must exit
with exactly that code. A mismatch fails with the command, exit code, stdout and stderr.
Import the helper in a test module with ``from conftest import run_fimio`` if needed.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

STORE_DIR = "/fimio/store"


def fimio_executable() -> str:
    """The ``fimio`` console script of the running interpreter's environment (else PATH's)."""
    here = os.path.dirname(sys.executable)
    found = shutil.which("fimio", path=here + os.pathsep + os.environ.get("PATH", ""))
    if found is None:
        pytest.fail("the 'fimio' console script is not installed (pip install -e .)")
    return found


def fimio_env(root, env: dict | None = None) -> dict:
    """The environment of a fimio subprocess: no inherited FIMIO_* settings, our root and
    no config file (``/dev/null``), then ``env`` on top."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("FIMIO_")}
    base["FIMIO_ROOT"] = str(root)
    base["FIMIO_CONFIG"] = os.devnull
    if env:
        base.update({k: str(v) for k, v in env.items()})
    return base


def run_fimio(args, root, input=None, check=None, env=None, text: bool = True,
              timeout: float = 300, cwd=None, prefix=(), preexec_fn=None) -> subprocess.CompletedProcess:
    """Run ``fimio ARGS...`` with ``FIMIO_ROOT=root``; return the CompletedProcess.

    ``input``: str or bytes for stdin (bytes imply ``text=False``). ``text=False`` gives
    bytes stdout/stderr (for ``dump``). ``prefix``: a command to wrap fimio in (e.g.
    ``["setpriv", ...]``). ``preexec_fn``: run in the child before fimio starts (a umask,
    a CPU affinity: what fimio inherits from its caller).
    """
    if isinstance(input, bytes):
        text = False
    cmd = [*prefix, fimio_executable(), *[os.fspath(a) for a in args]]
    proc = subprocess.run(cmd, input=input, capture_output=True, text=text, env=fimio_env(root, env),
                          timeout=timeout, cwd=cwd, preexec_fn=preexec_fn)
    if check is not None:
        want = 0 if check is True else int(check)
        if proc.returncode != want:
            err = proc.stderr if text else proc.stderr.decode(errors="replace")
            out = proc.stdout if text else proc.stdout[:2000].decode(errors="replace")
            pytest.fail(f"{cmd} exited {proc.returncode}, expected {want}\nstdout: {out}\nstderr: {err}",
                        pytrace=False)
    return proc


def run_on_terminal(args, root, env=None, timeout: float = 300, stdout_too: bool = False) -> tuple[int, str, str]:
    """Run ``fimio ARGS...`` with stderr on a pseudo-terminal (stdout a file, or with
    ``stdout_too`` the terminal as well; stdin empty), as a user at a terminal does; return
    (exit code, stdout, everything the terminal got)."""
    import pty
    import select
    import tempfile
    import time

    master, slave = pty.openpty()
    with tempfile.TemporaryFile() as out:  # a file: a large stdout cannot block the child
        try:
            proc = subprocess.Popen([fimio_executable(), *[os.fspath(a) for a in args]], stdin=subprocess.DEVNULL,
                                    stdout=slave if stdout_too else out, stderr=slave, env=fimio_env(root, env))
        finally:
            os.close(slave)
        shown = []
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([master], [], [], left)[0]:
                    proc.kill()
                    pytest.fail(f"fimio {args} did not finish within {timeout} s")
                try:
                    data = os.read(master, 1 << 16)
                except OSError:  # EIO: the last writer closed the terminal
                    break
                if not data:
                    break
                shown.append(data)
        finally:
            os.close(master)
        code = proc.wait(max(deadline - time.monotonic(), 1))
        out.seek(0)
        stdout = out.read()
    return code, stdout.decode(errors="replace"), b"".join(shown).decode(errors="replace")


class Fimio:
    """``run_fimio`` bound to one root: ``cli("add", path, check=0).stdout``."""

    def __init__(self, root: pathlib.Path):
        self.root = pathlib.Path(root)
        self.physical_store = self.root / "store"

    def __call__(self, *args, input=None, check=None, env=None, text=True, **kw):
        return run_fimio(list(args), self.root, input=input, check=check, env=env, text=text, **kw)

    def out(self, *args, **kw) -> str:
        """stdout of a command that must succeed, stripped."""
        return self(*args, check=0, **kw).stdout.strip()


@pytest.fixture
def fimio():
    """The ``run_fimio(args, root, ...)`` function."""
    return run_fimio


@pytest.fixture
def cli(tmp_path) -> Fimio:
    """The real console script on the per-test root ``tmp_path / "root"``."""
    return Fimio(tmp_path / "root")


@pytest.fixture
def store(tmp_path):
    """A LocalStore at ``tmp_path / "root"`` (the ``cli`` root), store dir /fimio/store."""
    from fimio.store.local import LocalStore

    s = LocalStore(str(tmp_path / "root"), STORE_DIR)
    try:
        yield s
    finally:
        s.close()


def nix_available(tool: str = "nix-store") -> bool:
    """True when the Nix oracle can be used. Missing Nix fails the test unless FIMIO_NO_NIX=1."""
    if shutil.which(tool):
        return True
    if os.environ.get("FIMIO_NO_NIX") == "1":
        pytest.skip(f"{tool} not installed and FIMIO_NO_NIX=1")
    pytest.fail(f"{tool} (Nix) is required as the test oracle; install nix-bin or set FIMIO_NO_NIX=1")
    return False


def assert_one_error_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Assert exit ``code`` and exactly one stderr line ``fimio: error: ...`` with no traceback
    that contains every needle; return that line."""
    err = proc.stderr if isinstance(proc.stderr, str) else proc.stderr.decode(errors="replace")
    assert proc.returncode == code, f"exit {proc.returncode}, expected {code}; stderr: {err}"
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("fimio: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]
