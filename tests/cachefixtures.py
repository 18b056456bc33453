"""Real cache servers on loopback for the cache tests (not a test module).

* :func:`free_port`, :func:`wait_port`
* :class:`Serve`: ``fimio serve`` as a subprocess (``Serve(cache_dir, tokens=…)``), stopped
  with SIGTERM; ``.url``.
* :class:`StaticServer`: ``python -m http.server`` over a directory (a read-only cache).
* :class:`MotoS3`: moto's standalone S3 server; ``.bucket(name)`` creates a bucket;
  ``.env`` holds the AWS_* variables both this process and fimio subprocesses need.
* :func:`make_keys`: a fresh signing key and its public key.
* :func:`write_config`: a config.toml for fimio subprocesses.

Import with ``from cachefixtures import ...`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import fimio_env, fimio_executable

WRITE_TOKEN = "write-token-0123456789"
READ_TOKEN = "read-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stderr.read() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def make_keys(name: str = "test-1"):
    from fimio.store.cache.keys import SecretKey

    sk = SecretKey.generate(name)
    return sk, str(sk.public_key())


def write_config(path, trusted=(), substituters=(), secret_key_files=(), require_sigs=True, tokens=None) -> str:
    def arr(xs):
        return "[" + ", ".join(f'"{x}"' for x in xs) + "]"

    lines = [f"trusted-public-keys = {arr(trusted)}", f"substituters = {arr(substituters)}",
             f"secret-key-files = {arr(secret_key_files)}", f"require-sigs = {'true' if require_sigs else 'false'}"]
    if tokens:
        lines.append("[tokens]")
        lines += [f'"{u}" = "{t}"' for u, t in tokens.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


class Serve:
    """``fimio serve`` on a free loopback port. ``tokens``: dict token -> scope, or None."""

    def __init__(self, cache_url: str, workdir, tokens: dict | None = None, anonymous_read=False, extra=()):
        args = [fimio_executable(), "serve", "--cache", cache_url, "--listen", "127.0.0.1:0", *extra]
        if tokens is not None:
            tf = os.path.join(str(workdir), f"tokens-{os.urandom(4).hex()}")
            with open(tf, "w") as f:
                f.write("".join(f"{t} {s}\n" for t, s in tokens.items()))
            args += ["--tokens", tf]
        if anonymous_read:
            args.append("--anonymous-read")
        env = fimio_env(os.path.join(str(workdir), "serve-root"), MotoS3.current_env())
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.url = self._wait_ready()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if r:
                line = self.proc.stderr.readline()
                if " on http://" in line:
                    return line.split(" on ", 1)[1].split()[0]
                if not line and self.proc.poll() is not None:
                    break
        self.stop()
        raise RuntimeError("fimio serve did not start")

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class StaticServer:
    """A plain static file server over ``directory`` (read-only cache over http)."""

    def __init__(self, directory):
        os.makedirs(directory, exist_ok=True)
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", str(self.port), "--bind", "127.0.0.1",
                                      "-d", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


class MotoS3:
    """moto's standalone S3 server on a free loopback port."""

    _env: dict = {}

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1"}
        exe = os.path.join(os.path.dirname(sys.executable), "moto_server")
        argv = [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "moto.server"]
        self.proc = subprocess.Popen([*argv, "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        MotoS3._env = self.env
        self._n = 0

    @staticmethod
    def current_env() -> dict:
        return dict(MotoS3._env)

    def bucket(self) -> str:
        import boto3

        self._n += 1
        name = f"cache-{os.getpid()}-{self._n}-{os.urandom(3).hex()}"
        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=name)
        return name

    def url(self, prefix: str = "team/cache") -> str:
        return f"s3://{self.bucket()}/{prefix}?endpoint={self.endpoint}&region=us-east-1"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        MotoS3._env = {}


@pytest.fixture(scope="session")
def moto_s3():
    try:
        import moto.server  # noqa: F401
    except ImportError:
        pytest.fail("moto[server] is required for the s3:// tests (pip install -e '.[test]')")
    server = MotoS3()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
