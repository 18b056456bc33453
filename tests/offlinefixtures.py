"""Helpers shared by the offline and bundle tests: signing keys, config files, a loopback
file server, a TCP listener that records connection attempts, copies of the examples with
the fetch URL pointed at the file server, and a store snapshot for "nothing changed"."""

from __future__ import annotations

import http.server
import json
import os
import pathlib
import shutil
import socket
import threading

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def make_key(tmp_path: pathlib.Path, name: str = "test-1") -> tuple[str, str]:
    """A new secret key file under ``tmp_path``; returns ``(secret file, public key)``."""
    from fimio.store.cache.keys import SecretKey

    key = SecretKey.generate(name)
    path = tmp_path / f"{name}.secret"
    path.write_text(str(key) + "\n")
    return str(path), str(key.public_key())


def write_config(path: pathlib.Path, **settings) -> str:
    """A config.toml with ``settings`` (underscores become dashes); returns its path."""
    lines = []
    for key, value in settings.items():
        lines.append(f"{key.replace('_', '-')} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


class FileServer:
    """``http.server`` serving a directory on a free loopback port, in a thread."""

    def __init__(self, directory: str):
        handler = lambda *a, **kw: _QuietHandler(*a, directory=directory, **kw)  # noqa: E731
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class ConnectionRecorder:
    """A TCP listener on a free loopback port that counts every connection made to it."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._stop = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.05)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> int:
        """Stop listening (idempotent); return the number of connections seen."""
        if not self._stop:
            self._stop = True
            self.thread.join()
            self.sock.setblocking(False)
            while True:  # handshakes the kernel completed but we had not accepted yet count too
                try:
                    self.sock.accept()[0].close()
                except OSError:
                    break
                self.connections += 1
            self.sock.close()
        return self.connections


def copy_examples(dest: pathlib.Path, port: int) -> pathlib.Path:
    """Copy examples/graph and examples/fetch to ``dest``, the fetch URL pointing at
    ``127.0.0.1:port`` (the output path does not depend on the URL)."""
    for name in ("graph", "fetch"):
        shutil.copytree(EXAMPLES / name, dest / name)
    fetch = dest / "fetch" / "fetch.toml"
    text = fetch.read_text()
    fetch.write_text(text.replace("http://127.0.0.1:8765/", f"http://127.0.0.1:{port}/"))
    assert f":{port}/" in fetch.read_text()
    return dest


def targets(examples: pathlib.Path) -> list[str]:
    return [str(examples / "graph" / "report.toml"), str(examples / "fetch" / "use.toml")]


def snapshot(cli) -> dict:
    """Everything an import could change: the entries of store/, .links and tmp/, and the
    ``path-info --json -r`` of every valid path."""
    store = cli.physical_store
    names = sorted(n for n in os.listdir(store) if n != ".links") if store.exists() else []
    info = json.loads(cli.out("path-info", "--json", "-r", *[str(store / n) for n in names])) if names else []
    return {
        "store": names,
        "links": sorted(os.listdir(store / ".links")) if (store / ".links").exists() else [],
        "tmp": sorted(os.listdir(cli.root / "tmp")) if (cli.root / "tmp").exists() else [],
        "info": info,
    }


def digests(cli, paths) -> dict:
    """``{logical path: root digest}`` of valid store paths."""
    return {r["path"]: r["digest"] for r in json.loads(cli.out("path-info", "--json", *paths))}
