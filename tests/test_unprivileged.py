"""The store of an unprivileged user: every writer works without root's bypass of file
permissions. Run as root, the commands run under ``setpriv`` without the capabilities that
bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER), so root meets the same
checks: moving a read-only directory to another parent, for one, needs write permission on
the directory itself."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from cachefixtures import make_keys, write_config
from conftest import assert_one_error_line, fimio_env, fimio_executable, run_fimio
from test_sandbox import EXAMPLES

_CAPS = "-dac_override,-dac_read_search,-fowner"


def _prefix() -> list[str]:
    return ["setpriv", "--bounding-set", _CAPS, "--inh-caps", _CAPS] if os.geteuid() == 0 else []


@pytest.fixture
def as_owner(tmp_path):
    """``run(root_name, *args)``: fimio as an unprivileged owner of the store."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is not installed: cannot drop root's permission bypass")
    prefix = _prefix()
    sk, pk = make_keys("owner-1")
    (tmp_path / "sk").write_text(str(sk) + "\n")
    config = write_config(tmp_path / "config.toml", trusted=[pk], secret_key_files=[tmp_path / "sk"])

    def run(root: str, *args, check=0):
        proc = run_fimio(list(args), tmp_path / root, env={"FIMIO_CONFIG": config}, prefix=prefix, check=check)
        return proc.stdout if check == 0 else proc

    return run


def test_every_writer_works_without_the_permission_bypass(as_owner, tmp_path):
    src = tmp_path / "src" / "sub"
    src.mkdir(parents=True)
    (src / "f").write_text("f\n")
    hello = EXAMPLES / "hello" / "hello.toml"
    cache, bundle = f"file://{tmp_path / 'cache'}", tmp_path / "hello.bundle"

    secret = tmp_path / "secret.toml"  # a mode-000 output file is still its owner's to read
    secret.write_text('name = "secret"\nbuilder = "/bin/sh"\nargs = ["-c", "echo s > $out; chmod 000 $out"]\n'
                      '[env]\nPATH = "/usr/bin:/bin"\n')
    assert open(as_owner("a", "realise", "--no-out-link", secret).strip()).read() == "s\n"
    added = as_owner("a", "add", tmp_path / "src").strip()
    built = as_owner("a", "realise", "--no-out-link", hello).strip()  # a directory output
    assert os.path.isdir(added) and os.path.isfile(os.path.join(built, "bin", "hello"))
    as_owner("a", "push", cache, hello)
    substituted = as_owner("b", "realise", "--no-out-link", "--substituter", cache, hello).strip()
    as_owner("a", "export", "--closure", hello, "-o", bundle)
    imported = as_owner("c", "import", bundle)
    assert os.path.basename(substituted) == os.path.basename(built) and os.path.basename(built) in imported

    victim = os.path.join(substituted, "bin", "hello")  # damage it, as root could
    os.chmod(victim, 0o644)
    with open(victim, "ab") as f:
        f.write(b"damage")
    as_owner("b", "verify", "--check-contents", "--repair", "--substituter", cache)
    assert run_fimio(["verify", "--check-contents"], tmp_path / "b").returncode == 0
    as_owner("a", "gc")
    assert not os.path.exists(added) and not os.path.exists(built)


def test_an_out_link_gc_cannot_read_stops_gc_and_keeps_what_it_roots(as_owner, tmp_path):
    """An unreadable out-link is not a gone one: its registration stays, and gc refuses
    rather than collect what the link may root."""
    f = tmp_path / "u.toml"
    f.write_text('name = "u"\nbuilder = "/bin/sh"\nargs = ["-c", "echo u > $out"]\n')
    (tmp_path / "links").mkdir()
    out = as_owner("a", "realise", f, "-o", tmp_path / "links" / "u").strip()
    os.chmod(tmp_path / "links", 0)
    try:
        proc = as_owner("a", "gc", check=None)
    finally:
        os.chmod(tmp_path / "links", 0o755)
    assert proc.returncode == 2 and "cannot read the out-link" in proc.stderr, proc.stderr
    as_owner("a", "gc")
    assert open(tmp_path / "links" / "u").read() == "u\n" and os.path.exists(out)


def test_an_out_link_in_a_directory_not_writable_is_refused_before_the_build(as_owner, tmp_path):
    f = tmp_path / "v.toml"
    f.write_text('name = "v"\nbuilder = "/bin/sh"\nargs = ["-c", "echo v > $out"]\n')
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    proc = as_owner("a", "realise", f, "-o", tmp_path / "ro" / "result", check=None)
    assert proc.returncode == 2 and "is not writable" in proc.stderr, proc.stderr
    assert "built" not in proc.stderr  # refused before anything was built


def test_serve_needs_to_read_a_read_only_cache_and_to_write_a_writable_one(as_owner, tmp_path):
    """Read-only, it writes nothing into the cache (not even .tmp/); with write tokens, a
    directory it cannot write is refused at start, not with an error for every upload."""
    cache = tmp_path / "cache"
    cache.mkdir()
    os.chmod(cache, 0o555)
    tokens = tmp_path / "tokens"
    tokens.write_text("writer-token-1 write\n")
    proc = as_owner("a", "serve", "--cache", f"file://{cache}", "--tokens", tokens, "--listen", "127.0.0.1:0",
                    check=None)
    assert proc.returncode == 6 and "is not writable" in proc.stderr, proc.stderr
    server = subprocess.Popen([*_prefix(), fimio_executable(), "serve", "--cache", f"file://{cache}", "--listen",
                               "127.0.0.1:0"], env=fimio_env(tmp_path / "s"), stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in server.stderr.readline()
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    assert os.listdir(cache) == []


def test_export_names_an_unreadable_store_file_not_the_bundle(as_owner, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("some unique contents 7141\n")
    path = as_owner("a", "add", tmp_path / "d").strip()
    os.chmod(os.path.join(path, "f"), 0)  # the blob, shared by its hard link
    try:
        proc = as_owner("a", "export", path, "-o", tmp_path / "x.bundle", check=None)
    finally:
        os.chmod(os.path.join(path, "f"), 0o444)
    assert proc.returncode == 4 and "of the store" in proc.stderr and "x.bundle" not in proc.stderr, proc.stderr


def test_root_does_not_write_into_another_users_store(cli, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root can act on another user's store")
    from test_sandbox import write_drv

    f = write_drv(tmp_path / "u.toml", "u", "echo u > $out")
    cli.out("realise", "--no-out-link", f)
    os.chown(cli.root, 1234, 1234)
    try:
        refused = [cli("add", f), cli("realise", f, cwd=tmp_path)]  # the no-op fast path too
    finally:
        os.chown(cli.root, 0, 0)
    for proc in refused:
        assert proc.returncode == 2 and "belongs to uid 1234" in proc.stderr, proc.stderr
    assert not os.path.lexists(tmp_path / "result")


def test_a_store_file_that_cannot_be_read_is_a_damaged_store(as_owner, tmp_path):
    # store files are read-only for all; one whose mode was changed so that its owner
    # cannot read it is a damaged store object (exit 4), named whole, not a disk problem
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_text("f\n")
    (src / "g").write_text("g\n")
    added = as_owner("a", "add", src).strip()
    os.chmod(os.path.join(added, "d", "f"), 0)
    cache = f"file://{tmp_path / 'cache'}"
    for args in (["cat", f"{added}/d/f"], ["dump", added]):
        assert_one_error_line(as_owner("a", *args, check=4), 4, f"cannot read '{added}/d/f' in the store",
                              "verify --check-contents")
    # push reads the file through its blob in .links: the same inode, named so
    assert_one_error_line(as_owner("a", "push", cache, added, check=4), 4, "/store/.links/", "in the store")
    verify = as_owner("a", "verify", "--check-contents", check=4)  # what the hint points to
    assert "cannot read" in verify.stdout + verify.stderr and "d/f" in verify.stdout + verify.stderr
    os.chmod(os.path.join(added, "d"), 0)
    assert_one_error_line(as_owner("a", "ls", f"{added}/d", check=4), 4, f"cannot read '{added}/d' in the store")
    assert as_owner("a", "ls", added).split() == ["d", "g"]


def test_add_of_an_unreadable_path_says_what_the_click_command_says(as_owner, tmp_path):
    # click checks that its PATH argument is readable: the add that runs without click
    # leaves such a path to it, so that the message is the same
    for name in ("secret-file", "secret-dir"):
        p = tmp_path / name
        p.mkdir() if name.endswith("dir") else p.write_text("s\n")
        os.chmod(p, 0)
        fast, slow = (run_fimio(["add", p], tmp_path / "a", env=env, prefix=_prefix())
                      for env in ({"FIMIO_CONFIG": os.devnull}, {"FIMIO_CONFIG": os.devnull, "FIMIO_NO_FAST_PATH": "1"}))
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr)
        assert_one_error_line(fast, 2, f"Path '{p}' is not readable")
