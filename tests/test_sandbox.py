"""The build sandbox (spec/sandbox.md), proved with real builds through ``fimio realise``.

No network, no undeclared host paths, no store path outside the input closure (not even
by exact name), no writes outside ``$out`` and ``/build``, exactly the contract's
environment, logical paths only, fixed identity, timeouts, failures with their log tail,
fixed-output fetches checked against their hash, and nothing registered after a failure.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import pathlib
import random
import shutil
import socket
import stat
import threading
import time

import pytest

from conftest import STORE_DIR, assert_one_error_line

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
GREETING = (EXAMPLES / "fetch" / "files" / "greeting.txt").read_bytes()


# ---- helpers shared with test_realise.py and test_gc.py ----------------------------------

def toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string


def write_drv(path, name, script="", *, builder="/bin/sh", args=None, env=None, inputs=None,
              outputs=None, sandbox=None, path_env=True) -> pathlib.Path:
    """Write a derivation file; ``script`` becomes ``args = ["-c", script]`` for /bin/sh."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"name = {toml_str(name)}", f"builder = {toml_str(builder)}"]
    args = ["-c", script] if args is None else args
    lines.append("args = [" + ", ".join(toml_str(a) for a in args) + "]")
    if outputs:
        lines.append("outputs = [" + ", ".join(toml_str(o) for o in outputs) + "]")
    env = dict(env or {})
    if path_env:
        env.setdefault("PATH", "/usr/bin:/bin")
    lines.append("[env]")
    lines += [f"{k} = {toml_str(v)}" for k, v in env.items()]
    lines.append("[inputs]")
    for var, spec in (inputs or {}).items():
        lines.append(f"{var} = {{ " + ", ".join(f"{k} = {toml_str(str(v))}" for k, v in spec.items()) + " }")
    if sandbox:
        lines.append("[sandbox]")
        for k, v in sandbox.items():
            lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def realise_json(cli, *args, check=0, **kw) -> dict:
    return json.loads(cli("realise", "--json", "--no-out-link", *args, check=check, **kw).stdout)


def out_of(result: dict, output: str = "out", target: int = 0) -> tuple[str, str]:
    """(logical, physical) path of an output in ``realise --json``."""
    o = result["targets"][target]["outputs"][output]
    return o["path"], o["physical"]


def outputs_of(cli, f) -> dict:
    """{output: logical path} of a derivation file, without building it."""
    (rec,) = json.loads(cli.out("instantiate", "--json", f))
    return {n: o["path"] for n, o in rec["outputs"].items()}


class FileServer:
    """A static HTTP server on a free loopback port, counting the requests it answers."""

    def __init__(self, directory):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                outer.requests.append(self.path)
                super().do_GET()

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(directory)))
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def fetch_example_copy(dest: pathlib.Path, url: str) -> pathlib.Path:
    """A copy of examples/fetch with fetch.toml's URL replaced by ``url``; returns the dir."""
    shutil.copytree(EXAMPLES / "fetch", dest)
    f = dest / "fetch.toml"
    text = f.read_text()
    assert "http://127.0.0.1:8765/greeting.txt" in text
    f.write_text(text.replace("http://127.0.0.1:8765/greeting.txt", url))
    return dest


@pytest.fixture(scope="module")
def file_server():
    srv = FileServer(EXAMPLES / "fetch" / "files")
    yield srv
    srv.close()


def not_registered(cli, *logical_paths):
    for p in logical_paths:
        assert_one_error_line(cli("path-info", p), 5, "not valid")
        assert not (cli.physical_store / os.path.basename(p)).exists()


# ---- isolation ------------------------------------------------------------------------

NET_PROBE = r"""
import os, socket, sys
port = int(sys.argv[1])
lines = []
for host in sys.argv[2:]:
    try:
        socket.create_connection((host, port), timeout=3).close()
        lines.append(f"{host} CONNECTED")
    except OSError as e:
        lines.append(f"{host} failed {type(e).__name__}")
with open("/proc/net/dev") as f:
    lines.append("interfaces " + " ".join(sorted(l.split(":")[0].strip() for l in f if ":" in l)))
open(os.environ["out"], "w").write("\n".join(lines) + "\n")
"""


def _outward_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 9))  # no packet is sent; this only picks a route
            ip = s.getsockname()[0]
        return None if ip.startswith("127.") else ip
    except OSError:
        return None


def test_no_network(cli, tmp_path):
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(8)
    server.setblocking(False)
    port = server.getsockname()[1]
    try:
        hosts = ["127.0.0.1"] + ([ip] if (ip := _outward_ip()) else [])
        f = write_drv(tmp_path / "net.toml", "net", builder="/usr/bin/python3",
                      args=["-I", "-c", NET_PROBE, str(port), *hosts])
        r = realise_json(cli, f)
        report = pathlib.Path(out_of(r)[1]).read_text().splitlines()
        for host in hosts:
            assert f"{host} failed" in " ".join(report), report
        assert "CONNECTED" not in " ".join(report)
        assert report[-1] == "interfaces lo"  # a fresh network namespace: loopback only
        with pytest.raises(BlockingIOError):
            server.accept()  # the server saw no connection
        # control: the server does accept connections from outside the sandbox
        socket.create_connection(("127.0.0.1", port), timeout=3).close()
        time.sleep(0.05)
        server.accept()[0].close()
    finally:
        server.close()


def test_undeclared_host_paths_are_absent(cli, tmp_path):
    (tmp_path / "marker").write_text("host file\n")
    probe = ["/etc/passwd", "/etc", "/root", "/home", "/var", "/tmp", "/opt", "/srv",
             str(tmp_path), str(tmp_path / "marker"), str(cli.root), "/etc/alternatives"]
    f = write_drv(tmp_path / "hp.toml", "host-paths", """
        for p in $PROBE; do
          if [ -e "$p" ] || [ -L "$p" ]; then echo "visible $p"; else echo "absent $p"; fi
        done > $out
        for p in /usr /bin /lib /lib64; do
          if [ -L "$p" ]; then echo "symlink $p $(readlink $p)"; elif [ -d "$p" ]; then echo "dir $p"; fi
        done >> $out
        echo "usr-writable $(touch /usr/.probe 2>/dev/null && echo yes || echo no)" >> $out
        """, env={"PROBE": " ".join(probe)})
    lines = pathlib.Path(out_of(realise_json(cli, f))[1]).read_text().splitlines()
    for p in probe:
        assert f"absent {p}" in lines, lines
    assert "usr-writable no" in lines
    for p in ("/usr", "/bin", "/lib", "/lib64"):
        if os.path.islink(p):  # a host symlink is recreated as the same symlink
            assert f"symlink {p} {os.readlink(p)}" in lines
        elif os.path.isdir(p):
            assert f"dir {p}" in lines
    # a declared host path becomes visible (and only then)
    if os.path.isdir("/etc/alternatives"):
        g = write_drv(tmp_path / "hp2.toml", "host-paths-2", 'ls -d /etc/alternatives /etc/passwd > $out 2>&1 || true',
                      sandbox={"host_paths": ["/usr", "/bin", "/lib", "/lib64", "/etc/alternatives"]})
        text = pathlib.Path(out_of(realise_json(cli, g))[1]).read_text()
        assert "/etc/alternatives\n" in text and "No such file" in text


def test_store_paths_outside_the_closure_are_unreachable_even_by_name(cli, tmp_path):
    (tmp_path / "secret").write_text("top secret\n")
    secret_phys = cli.out("add", tmp_path / "secret")
    secret = f"{STORE_DIR}/{os.path.basename(secret_phys)}"
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "file").write_text("in the closure\n")
    write_drv(tmp_path / "dep.toml", "dep", "echo $data > $out", inputs={"data": {"path": "data"}})
    f = write_drv(tmp_path / "probe.toml", "probe", """
        ls -a /fimio/store > /build/listing
        if cat $SECRET > /build/s 2>/dev/null; then echo "secret READ"; else echo "secret unreachable"; fi > /build/r
        if [ -e $SECRET ]; then echo "secret EXISTS"; fi >> /build/r
        if [ -e $PHYS ]; then echo "physical EXISTS"; fi >> /build/r
        echo "dep $(cat $dep)" >> /build/r
        echo "via-reference $(cat $(cat $dep)/file)" >> /build/r
        mkdir $out && cp /build/listing /build/r $out/
        """, env={"SECRET": secret, "PHYS": secret_phys}, inputs={"dep": {"drv": "dep.toml"}})
    r = realise_json(cli, f)
    out = pathlib.Path(out_of(r)[1])
    dep_out = outputs_of(cli, tmp_path / "dep.toml")["out"]
    data_src = (out / "r").read_text().split("dep ")[1].split("\n")[0]
    result = (out / "r").read_text().splitlines()
    assert result[0] == "secret unreachable"
    assert "secret EXISTS" not in result and "physical EXISTS" not in result
    assert "via-reference in the closure" in result  # the input's references are in the closure
    # the store directory lists exactly the input closure
    listing = set((out / "listing").read_text().split()) - {".", ".."}
    assert listing == {os.path.basename(dep_out), os.path.basename(data_src)}
    # and the secret's hash part, though written into the output, is not a reference
    refs = json.loads(cli.out("path-info", "--json", out))[0]["references"]
    assert secret not in refs


def test_a_symlink_in_the_closure_is_a_symlink_inside_never_a_window_on_the_host(cli, tmp_path):
    """A store path that is a symlink (a source or an output) appears as that symlink: it
    does not show the build what its target is on this host."""
    (tmp_path / "host-secret").write_text("host secret\n")
    os.symlink(tmp_path / "host-secret", tmp_path / "srclink")
    write_drv(tmp_path / "a.toml", "a", f"ln -s {tmp_path / 'host-secret'} $out")
    f = write_drv(tmp_path / "b.toml", "b", """
        for p in $a $src; do
          if cat "$p" >/dev/null 2>&1; then echo "READ $p"; else echo "dangling $(readlink $p)"; fi
        done > $out
        """, inputs={"a": {"drv": "a.toml"}, "src": {"path": "srclink"}})
    lines = pathlib.Path(out_of(realise_json(cli, f))[1]).read_text().splitlines()
    assert lines == [f"dangling {tmp_path / 'host-secret'}"] * 2


def test_writes_outside_out_and_build_fail(cli, tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "f").write_text("source\n")
    f = write_drv(tmp_path / "w.toml", "writes", """
        try() { if ( echo x > "$1" ) 2>/dev/null; then echo "WROTE $1"; else echo "denied $1"; fi; }
        try /usr/probe; try /probe; try /fimio/probe; try $s/probe; try $s/f; try /etc/probe; try /proc/probe
        try /build/probe; try /fimio/store/stray-file
        mkdir -p $out; echo ok > $out/ok && echo "WROTE \\$out"
        """, inputs={"s": {"path": "s"}})
    out = pathlib.Path(out_of(realise_json(cli, f))[1])
    log = cli.out("log", f).splitlines()
    for p in (" /usr/probe", " /probe", " /fimio/probe", "-s/probe", "-s/f", " /etc/probe", " /proc/probe"):
        assert any(line.startswith("denied") and line.endswith(p) for line in log), (p, log)
    assert "WROTE /build/probe" in log and "WROTE $out" in log
    assert (out / "ok").read_text() == "ok\n"
    # the scratch store is private to the build: nothing but the outputs leaves it
    assert "WROTE /fimio/store/stray-file" in log
    assert not (cli.physical_store / "stray-file").exists()
    assert (tmp_path / "s" / "f").read_text() == "source\n"
    src = json.loads(cli.out("path-info", "--json", "-r", out))
    assert all(not os.path.exists(os.path.join(i["physical"], "probe")) for i in src)


def _environ(path) -> dict:
    data = pathlib.Path(path).read_bytes()
    items = [kv.split("=", 1) for kv in data.decode().split("\0") if kv]
    return dict(items), [k for k, _ in items]


def test_environment_is_exactly_the_contracts(cli, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_text("a")
    write_drv(tmp_path / "dep.toml", "dep", "echo dep > $out")
    # /proc/$$/environ is what bwrap passed to the builder, before the shell adds PWD
    f = write_drv(tmp_path / "env.toml", "env", "/usr/bin/cat /proc/$$/environ > $out; /usr/bin/mkdir $dev",
                  outputs=["out", "dev"], env={"GREETING": "hello world", "EMPTY": ""},
                  inputs={"src": {"path": "src"}, "dep": {"drv": "dep.toml"}})
    r = realise_json(cli, f)
    env, order = _environ(out_of(r)[1])
    dep_out = outputs_of(cli, tmp_path / "dep.toml")["out"]
    src = json.loads(pathlib.Path(r["targets"][0]["physical"]).read_bytes())["inputs"]["src"]["src"]
    assert env == {
        "PATH": "/usr/bin:/bin",
        "GREETING": "hello world",
        "EMPTY": "",
        "src": src,
        "dep": dep_out,
        "out": out_of(r)[0],
        "dev": out_of(r, "dev")[0],
        "HOME": "/homeless-shelter",
        "TMPDIR": "/build",
        "TZ": "UTC",
        "LANG": "C.UTF-8",
        "SOURCE_DATE_EPOCH": "315532800",
        "FIMIO_BUILD_CORES": str(os.cpu_count()),
        "FIMIO_STORE": STORE_DIR,
        "PWD": "/build",  # set by bwrap itself after --chdir (spec/sandbox.md)
    }
    assert [k for k in order if k != "PWD"] == sorted(set(order) - {"PWD"})  # sorted (spec/sandbox.md)
    # without [env] PATH the builder gets a PATH that finds nothing
    g = write_drv(tmp_path / "nopath.toml", "nopath", "/usr/bin/cat /proc/$$/environ > $out", path_env=False)
    env2, _ = _environ(out_of(realise_json(cli, g))[1])
    assert env2["PATH"] == "/path-not-set"
    assert set(env2) == {"PATH", "PWD", "out", "HOME", "TMPDIR", "TZ", "LANG", "SOURCE_DATE_EPOCH",
                         "FIMIO_BUILD_CORES", "FIMIO_STORE"}


def test_identity_and_logical_paths(cli, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_text("a\n")
    f = write_drv(tmp_path / "id.toml", "identity", """
        mkdir $out
        {
          echo "uid $(id -u) gid $(id -g) groups $(id -G)"
          echo "hostname $(cat /proc/sys/kernel/hostname) $(uname -n)"
          echo "cwd $(pwd) $(pwd -P)"
          echo "src $src $(realpath $src) $(cat $src/a)"
          echo "out $(realpath $out)"
          ls -la /fimio/store / /build
          env
        } > $out/report
        """, inputs={"src": {"path": "src"}})
    r = realise_json(cli, f)
    text = (pathlib.Path(out_of(r)[1]) / "report").read_text()
    lines = text.splitlines()
    assert "uid 1000 gid 100 groups 100" in lines
    assert "hostname localhost localhost" in lines
    assert "cwd /build /build" in lines
    src = [line for line in lines if line.startswith("src ")][0].split()
    assert src[1] == src[2] and src[1].startswith(STORE_DIR + "/") and src[3] == "a"
    assert f"out {out_of(r)[0]}" in lines
    # the physical root appears nowhere the build looked (env, paths, listings)
    assert str(cli.root) not in text and str(tmp_path) not in text


# ---- failures ---------------------------------------------------------------------------

def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if marker.encode() in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(int(pid))
            except OSError:
                pass
    return found


def test_timeout_kills_the_build(cli, tmp_path):
    marker = f"{random.randint(100, 999)}.{random.randint(1000, 9999)}"
    f = write_drv(tmp_path / "slow.toml", "slow", f"echo started; (sleep {marker}; echo late) & sleep {marker}",
                  sandbox={"timeout": 1})
    out = outputs_of(cli, f)["out"]
    start = time.monotonic()
    proc = cli("realise", "--no-out-link", f)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1, proc.stderr
    assert elapsed < 15
    err = proc.stderr.splitlines()
    assert err[-1].startswith("fimio: error: build of ") and "timed out after 1 s" in err[-1]
    assert "Traceback" not in proc.stderr
    assert "  > started" in err  # the log tail
    deadline = time.monotonic() + 5
    while _processes_with(f"sleep\0{marker}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _processes_with(f"sleep\0{marker}") == []  # the whole process tree is gone
    not_registered(cli, out)


def test_failing_builder(cli, tmp_path):
    f = write_drv(tmp_path / "fail.toml", "fail", 'mkdir $out; for i in $(seq 1 30); do echo "line-$i"; done; exit 3')
    out = outputs_of(cli, f)["out"]
    proc = cli("realise", "--no-out-link", f)
    assert proc.returncode == 1
    err = proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr
    assert [e for e in err if e.startswith("fimio: error:")] == [err[-1]]
    assert "failed with exit code 3" in err[-1] and "fimio log" in err[-1]
    assert "last 25 log lines:" in err
    assert "  > line-30" in err and "  > line-6" in err and "  > line-5" not in err
    not_registered(cli, out)
    # the full log of the failed build is kept
    assert cli.out("log", f).splitlines() == [f"line-{i}" for i in range(1, 31)]
    # no leftovers in tmp/ (the build directory is removed without --keep-failed)
    assert [e for e in os.listdir(cli.root / "tmp") if e.startswith("build-")] == []


@pytest.mark.parametrize("script,needle", [
    ("echo no output", "did not create output 'out'"),
    ("mkdir $out && /usr/bin/mkfifo $out/pipe", "contains a fifo at '$out/pipe'"),
    ("kill -9 $$", "exit code 137"),  # bwrap reports a killed builder as 128 + signal
    # deeper than the store allows (spec/tree.md §3): never registered, as add refuses it
    ("mkdir $out && cd $out && for i in $(seq 600); do mkdir d && cd d; done && echo x > f",
     "has entries nested deeper than 512 levels"),
    # deeper than a path can name: refused, and its scratch directory still removed
    ("mkdir $out && cd $out && /usr/bin/python3 -c 'import os\nfor i in range(30): os.mkdir(\"n\" * 200); "
     "os.chdir(\"n\" * 200)'", "has a file whose path is longer than the system allows"),
], ids=["no-output", "fifo-in-output", "killed", "too-deep", "path-too-long"])
def test_other_build_failures(cli, tmp_path, script, needle):
    f = write_drv(tmp_path / "x.toml", "x", "echo the builder ran; " + script)
    out = outputs_of(cli, f)["out"]
    proc = cli("realise", "--no-out-link", f)
    assert proc.returncode == 1, proc.stderr
    assert needle in proc.stderr.splitlines()[-1]
    not_registered(cli, out)
    assert cli.out("log", f).startswith("the builder ran")  # the log of a failed build is kept
    assert [e for e in os.listdir(cli.root / "tmp") if e.startswith("build-")] == []
    cli.out("verify")  # and the store is whole


def test_builder_outside_the_sandbox(cli, tmp_path):
    f = write_drv(tmp_path / "b.toml", "b", builder="/opt/tool/run", args=[])
    proc = cli("realise", "--no-out-link", f)
    assert_one_error_line(proc, 1, "'/opt/tool/run'", "not visible in the sandbox")


# ---- outputs: normalisation and references ----------------------------------------------

def test_hard_links_in_an_output_stay_what_they_are(cli, tmp_path):
    """Files of an output that are hard links of each other, or share contents with names
    of every kind: the output holds exactly what the builder made, and verifies clean."""
    f = write_drv(tmp_path / "h.toml", "hardlinks", """
        mkdir $out; echo y > $out/a; ln $out/a $out/b; ln $out/a $out/c
        echo same > $out/f; echo same > $out/g; echo other > $out/g.fimio-link
        """)
    out = pathlib.Path(out_of(realise_json(cli, f))[1])
    assert sorted(os.listdir(out)) == ["a", "b", "c", "f", "g", "g.fimio-link"]
    assert [(out / n).read_text() for n in ("b", "g", "g.fimio-link")] == ["y\n", "same\n", "other\n"]
    proc = cli("verify", "--check-contents")
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_outputs_are_normalised(cli, tmp_path):
    f = write_drv(tmp_path / "n.toml", "norm", """
        mkdir -p $out/sub/empty
        echo data > $out/file; chmod 4600 $out/file
        echo '#!/bin/sh' > $out/tool; chmod 6711 $out/tool
        echo 'not for the owner' > $out/others; chmod 0651 $out/others
        python3 -c "import os, sys; os.setxattr(sys.argv[1], 'user.mark', b'1')" $out/others
        chmod 0700 $out/sub; chmod 1777 $out/sub/empty
        ln -s file $out/link
        touch -d '2001-02-03 04:05:06' $out/file $out/tool
        """)
    out = pathlib.Path(out_of(realise_json(cli, f))[1])
    modes = {}
    for dirpath, dirnames, filenames in os.walk(out):
        for name in [".", *dirnames, *filenames]:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            assert st.st_mtime == 1, p
            modes[os.path.relpath(p, out)] = stat.S_IMODE(st.st_mode) if not stat.S_ISLNK(st.st_mode) else "link"
    # executable iff the owner's bit was set (spec/tree.md §1, as `add` and Nix decide)
    assert modes == {".": 0o555, "sub": 0o555, "sub/empty": 0o555, "file": 0o444, "tool": 0o555, "others": 0o444,
                     "link": "link"}
    assert os.listxattr(out / "others") == []  # extended attributes are no part of a tree
    assert os.stat(out).st_uid == os.getuid()
    assert os.readlink(out / "link") == "file"


def test_references_are_found_by_scanning(cli, tmp_path):
    write_drv(tmp_path / "a.toml", "a", "echo a > $out")
    write_drv(tmp_path / "b.toml", "b", "echo b > $out")
    f = write_drv(tmp_path / "c.toml", "c", """
        mkdir $out $dev
        echo "uses $a" > $out/config
        printf 'binary\\000%s\\000' "$out" > $dev/self-and-out
        printf '%s' "$dev" | rev > $out/reversed-dev-not-a-reference
        """, outputs=["out", "dev"], inputs={"a": {"drv": "a.toml"}, "b": {"drv": "b.toml"}})
    r = realise_json(cli, f)
    a_out = outputs_of(cli, tmp_path / "a.toml")["out"]
    info = {i["path"]: i for i in json.loads(cli.out("path-info", "--json", out_of(r)[1], out_of(r, "dev")[1]))}
    assert info[out_of(r)[0]]["references"] == [a_out]  # b is an input but not referenced
    assert info[out_of(r, "dev")[0]]["references"] == [out_of(r)[0]]
    assert info[out_of(r)[0]]["deriver"] == r["targets"][0]["drvPath"]


# ---- fixed-output derivations -------------------------------------------------------------

def test_fixed_output_fetch(cli, tmp_path, file_server):
    original = outputs_of(cli, EXAMPLES / "fetch" / "fetch.toml")["out"]
    d = fetch_example_copy(tmp_path / "fetch", f"{file_server.url}/greeting.txt")
    before = len(file_server.requests)
    r = realise_json(cli, d / "fetch.toml")
    logical, physical = out_of(r)
    assert logical == original  # the URL is not part of the output path
    assert pathlib.Path(physical).read_bytes() == GREETING
    assert stat.S_IMODE(os.stat(physical).st_mode) == 0o444
    assert file_server.requests[before:] == ["/greeting.txt"]
    # another URL for the same content: same output path, already valid, not fetched again
    e = fetch_example_copy(tmp_path / "fetch2", f"http://localhost:{file_server.port}/greeting.txt?mirror=2")
    r2 = realise_json(cli, e / "fetch.toml")
    assert out_of(r2)[0] == logical and r2["built"] == []
    assert r2["targets"][0]["drvPath"] != r["targets"][0]["drvPath"]
    assert len(file_server.requests) == before + 1
    # the consumer sees the fetched file through its input
    r3 = realise_json(cli, d / "use.toml")
    assert pathlib.Path(out_of(r3)[1]).read_text() == GREETING.decode().upper()
    assert r3["built"] == [r3["targets"][0]["drvPath"]]
    # a blake3 declaration of the same content is another fixed-output path
    import blake3
    b3 = d / "b3.toml"
    b3.write_text((d / "fetch.toml").read_text().replace(
        f"sha256:{hashlib.sha256(GREETING).hexdigest()}", f"blake3:{blake3.blake3(GREETING).hexdigest()}"))
    r4 = realise_json(cli, b3)
    assert out_of(r4)[0] != logical and pathlib.Path(out_of(r4)[1]).read_bytes() == GREETING


def test_fixed_output_hash_mismatch(cli, tmp_path, file_server):
    d = fetch_example_copy(tmp_path / "fetch", f"{file_server.url}/greeting.txt")
    f = d / "fetch.toml"
    declared = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    f.write_text(f.read_text().replace("sha256:" + hashlib.sha256(GREETING).hexdigest(), declared))
    out = outputs_of(cli, f)["out"]
    proc = cli("realise", "--no-out-link", f)
    line = assert_one_error_line(proc, 4, "hash mismatch", declared)
    assert "sha256:" + hashlib.sha256(GREETING).hexdigest() in line
    not_registered(cli, out)
    # nor is the consumer built
    use_out = outputs_of(cli, d / "use.toml")["out"]
    assert cli("realise", "--no-out-link", d / "use.toml").returncode == 4
    not_registered(cli, use_out)
    assert [e for e in os.listdir(cli.root / "tmp") if e.startswith(("fetch-", "build-"))] == []


@pytest.mark.parametrize("answer", [b"GARBAGE LINE\r\n\r\n",
                                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nhel"],
                         ids=["status-line", "cut-chunked"])
def test_fixed_output_from_a_broken_server(cli, tmp_path, answer):
    """A server that answers nonsense: not found (exit 5), one line, nothing left."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()

        def serve():
            conn, _ = srv.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        d = fetch_example_copy(tmp_path / "fetch", f"http://127.0.0.1:{srv.getsockname()[1]}/greeting.txt")
        out = outputs_of(cli, d / "fetch.toml")["out"]
        assert_one_error_line(cli("realise", "--no-out-link", d / "fetch.toml"), 5, "broken answer")
        t.join(5)
    not_registered(cli, out)
    assert [e for e in os.listdir(cli.root / "tmp") if e.startswith("fetch-")] == []


@pytest.mark.parametrize("url", ["http://[::1/x", "http:///no-host", "http://host:notaport/x", "ftp://host/x"])
def test_a_malformed_fetch_url_is_bad_input(cli, tmp_path, url):
    d = fetch_example_copy(tmp_path / "fetch", url)
    assert_one_error_line(cli("instantiate", d / "fetch.toml"), 2, "[fetch] url")


def test_a_fetch_of_a_device_is_refused_at_once(cli, tmp_path):
    """A fetch of file:///dev/zero would never end (it filled a disk): a device is refused, one
    line, exit 2, nothing written. (/dev/null here: it would end at once were it not refused.)"""
    drv = tmp_path / "null.toml"
    drv.write_text(f'name = "null"\n[fetch]\nurl = "file:///dev/null"\nhash = "sha256:{"0" * 64}"\n')
    assert_one_error_line(cli("realise", "--no-out-link", drv), 2, "not a regular file")
    assert [e for e in os.listdir(cli.root / "tmp") if e.startswith("fetch-")] == []


def test_a_full_disk_during_a_fetch_is_the_disk_s_error_not_the_url_s(cli, tmp_path, monkeypatch):
    """ENOSPC while writing a download: exit 1 with the free-space hint, not 'cannot fetch'
    (exit 5) with a hint about the network."""
    import errno as errno_

    from fimio.store import build
    from fimio.store.local import LocalStore

    (tmp_path / "data.txt").write_text("data\n")
    drv = tmp_path / "data.toml"
    drv.write_text(f'name = "data.txt"\n[fetch]\nurl = "file://{tmp_path / "data.txt"}"\nhash = "sha256:{"0" * 64}"\n')
    store = LocalStore.open(str(cli.root))
    try:
        from fimio.store.instantiate import Graph

        d = Graph(store).from_file(str(drv))
        real_open = open

        def full_disk_open(path, mode="r", *args, **kw):
            f = real_open(path, mode, *args, **kw)
            if "w" in mode and "fetch-" in str(path):
                def write(_data):
                    raise OSError(errno_.ENOSPC, "No space left on device")
                f.write = write
            return f

        monkeypatch.setattr("builtins.open", full_disk_open)
        with pytest.raises(OSError) as e:
            build.fetch(store, d)
        assert e.value.errno == errno_.ENOSPC and e.value.filename and "fetch-" not in e.value.filename
    finally:
        monkeypatch.undo()
        store.close()


def test_fixed_output_unreachable_url(cli, tmp_path, file_server):
    d = fetch_example_copy(tmp_path / "fetch", f"{file_server.url}/no-such-file.txt")
    out = outputs_of(cli, d / "fetch.toml")["out"]
    assert_one_error_line(cli("realise", "--no-out-link", d / "fetch.toml"), 5, "cannot fetch")
    not_registered(cli, out)


def test_references_in_file_names_are_found(cli, tmp_path):
    write_drv(tmp_path / "a.toml", "a", "echo a > $out")
    f = write_drv(tmp_path / "n.toml", "names", 'mkdir $out; touch "$out/$(basename $a)"',
                  inputs={"a": {"drv": "a.toml"}})
    r = realise_json(cli, f)
    a_out = outputs_of(cli, tmp_path / "a.toml")["out"]
    assert json.loads(cli.out("path-info", "--json", out_of(r)[1]))[0]["references"] == [a_out]


# ---- what a build must not see of the machine it runs on -------------------------------------


def _built_text(cli, tmp_path, name, script, **kw) -> str:
    drv = write_drv(tmp_path / f"{name}.toml", name, script)
    _, physical = out_of(realise_json(cli, drv, **kw))
    return pathlib.Path(physical).read_text()


def test_the_callers_umask_does_not_reach_the_build(cli, tmp_path):
    script = "stat -c %a . /fimio/store > $out"
    as_usual = _built_text(cli, tmp_path, "modes", script)
    cli2 = type(cli)(tmp_path / "strict-root")
    strict = _built_text(cli2, tmp_path, "modes", script, preexec_fn=lambda: os.umask(0o077))
    assert as_usual == strict == "755\n755\n"


def test_the_builders_output_is_the_same_kind_of_file_with_and_without_v(cli, tmp_path):
    script = 'kind=$(stat -L -c %F /proc/self/fd/2); where=$(readlink /proc/self/fd/2); echo "$kind $where" > $out'
    quiet = _built_text(cli, tmp_path, "fds", script)
    cli2 = type(cli)(tmp_path / "verbose-root")
    drv = write_drv(tmp_path / "fds.toml", "fds", script)
    out = cli2("realise", "-v", "--no-out-link", drv, check=0).stdout.strip()
    verbose = pathlib.Path(out).read_text()
    assert quiet.split()[0] == verbose.split()[0] == "fifo", (quiet, verbose)
    assert quiet.split()[1].startswith("pipe:[")  # the log's physical path is not named


def test_machine_identities_in_proc_are_masked(cli, tmp_path):
    text = _built_text(cli, tmp_path, "ids", "cat /proc/sys/kernel/random/boot_id /proc/cmdline /proc/keys > $out")
    with open("/proc/sys/kernel/random/boot_id") as f:
        host_boot_id = f.read()
    assert text == "00000000-0000-0000-0000-000000000000\n\n" and host_boot_id not in text


def test_a_host_path_holding_the_store_root_shows_no_store_path(cli, tmp_path):
    """host_paths = [the directory holding the physical root]: the build must not find the
    store's paths, database or keys there; and fingerprinting such paths, /proc among them,
    neither walks the store nor reads a kernel file that never ends (/proc/kmsg)."""
    (tmp_path / "secret.txt").write_text("not an input\n")
    secret = cli.out("add", tmp_path / "secret.txt")
    f = write_drv(tmp_path / "peek.toml", "peek", f"""
        ls -A {cli.root} > $out.list 2>&1; cat {secret} > $out.secret 2>&1
        mkdir $out; mv $out.list $out/list; mv $out.secret $out/secret
        """, sandbox={"host_paths": ["/usr", "/bin", "/lib", "/lib64", str(tmp_path), "/proc"]})
    proc = cli("realise", "--no-out-link", f, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = pathlib.Path(proc.stdout.strip())
    assert (out / "list").read_text() == "" and "not an input" not in (out / "secret").read_text()
    record = json.loads(cli.out("provenance", "--json", f))["records"][-1]
    assert record["fingerprints"]["hostPaths"]["/proc"] == {"kind": "not-walked"}


@pytest.mark.parametrize("layout", ["through-a-symlink", "store-dir-in-root"])
def test_the_store_root_is_hidden_however_the_host_path_reaches_it(tmp_path, layout):
    """The root is hidden where the build sees it: under a host path spelled through a
    symlink (/home -> /var/home), and when the logical store directory is the physical one
    (a Nix-like layout: root /fimio, store /fimio/store), whose mount is made inside it."""
    from conftest import run_fimio

    (tmp_path / "real" / "u").mkdir(parents=True)
    os.symlink("real", tmp_path / "lnk")
    root = tmp_path / "real" / "u" / "fimio"
    env = {"FIMIO_STORE_DIR": f"{root}/store"} if layout == "store-dir-in-root" else {}
    host = tmp_path / "lnk" / "u" if layout == "through-a-symlink" else tmp_path / "real" / "u"
    (tmp_path / "secret.txt").write_text("not an input\n")
    run_fimio(["add", tmp_path / "secret.txt"], root, env=env, check=0)
    f = write_drv(tmp_path / "peek.toml", "peek", f"ls -A {host}/fimio > $out",
                  sandbox={"host_paths": ["/usr", "/bin", "/lib", "/lib64", str(host)]})
    out = run_fimio(["realise", "--no-out-link", f], root, env=env, check=0).stdout.strip()
    assert open(out).read() in ("", "store\n"), open(out).read()  # (the store directory's mount point)
    record = json.loads(run_fimio(["provenance", "--json", f], root, env=env, check=0).stdout)["records"][-1]
    walked = record["fingerprints"]["hostPaths"][str(host)]
    (root / "extra.txt").write_text("x\n")  # a change under the hidden root: no part of the fingerprint
    from fimio.store.hostfp import HostFingerprinter

    assert HostFingerprinter(hidden=[str(root)]).path(str(host)) == walked


def test_a_build_cannot_change_the_hosts_kernel_settings(cli, tmp_path):
    """The build's user is whoever runs fimio outside: run as root, procfs's owner checks
    alone would let it write host-wide settings. Writing a setting's own value back must be
    refused (it is harmless even if it were not), and so must the SysRq trigger."""
    text = _built_text(cli, tmp_path, "sysctl", """{
        for f in /proc/sys/kernel/printk_ratelimit /proc/sys/vm/swappiness; do
          if ( cat $f > $f ) 2>/dev/null; then echo "WROTE $f"; else echo "denied $f"; fi
        done
        if ( echo > /proc/sysrq-trigger ) 2>/dev/null; then echo "WROTE sysrq"; else echo "denied sysrq"; fi
        cat /proc/sys/kernel/hostname
        } > $out""")
    assert text.splitlines() == ["denied /proc/sys/kernel/printk_ratelimit", "denied /proc/sys/vm/swappiness",
                                 "denied sysrq", "localhost"], text


def test_the_build_cores_are_the_cpus_fimio_may_use(cli, tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to narrow")
    cpu = min(os.sched_getaffinity(0))
    text = _built_text(cli, tmp_path, "cpus", "echo $FIMIO_BUILD_CORES > $out; nproc >> $out",
                       preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert text == "1\n1\n"


def test_etc_is_fingerprinted_by_its_contents():
    from fimio.store.hostfp import HostFingerprinter

    record = HostFingerprinter().path("/etc")
    assert record["kind"] == "tree" and record["digest"].startswith("blake3:")


def test_a_build_that_cannot_start_leaks_no_descriptor(store, tmp_path, monkeypatch):
    """bwrap missing: every build fails before it starts, and the pipes that mask /proc
    files are closed each time (a long-running realise would otherwise run out of fds)."""
    from fimio.store.errors import BuildError
    from fimio.store.instantiate import Graph
    from fimio.store.realise import RealiseOptions, Realiser

    drv = Graph(store).from_file(str(write_drv(tmp_path / "x.toml", "x", "echo x > $out")))
    realiser = Realiser(store, RealiseOptions())
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(BuildError, match="bwrap"):
            realiser.build(drv)
    realiser.close()
    assert len(os.listdir("/proc/self/fd")) <= before


def test_a_build_output_never_links_to_a_blob_chmod_ed_by_hand(cli, tmp_path):
    """A store file is its blob: a build producing the same bytes as a damaged (chmod-ed)
    one gets a fresh, normal blob of its own."""
    (tmp_path / "same.txt").write_text("same-bytes\n")
    damaged = pathlib.Path(cli.out("add", tmp_path / "same.txt"))
    os.chmod(damaged, 0o644)
    f = write_drv(tmp_path / "same.toml", "same", "printf 'same-bytes\\n' > $out")
    out = pathlib.Path(out_of(realise_json(cli, f))[1])
    assert out.read_text() == "same-bytes\n"
    assert os.stat(out).st_mode & 0o777 == 0o444 and not os.path.samefile(out, damaged)
