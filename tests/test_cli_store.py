"""The store commands through the real ``fimio`` console script.

add, cat, ls, dump/restore (checked byte for byte against Nix), hash, path-info, query,
verify, and the bad-input cases of the contract (one ``fimio: error:`` line, exit 2).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from conftest import (STORE_DIR, assert_one_error_line, fimio_env, fimio_executable, nix_available, run_fimio,
                      run_on_terminal)
from fimio.store.local import LocalStore
from fimio.store.tree import format_digest, scan


def make_pkg(path: pathlib.Path) -> pathlib.Path:
    (path / "bin").mkdir(parents=True)
    (path / "share" / "doc").mkdir(parents=True)
    (path / "share" / "empty").mkdir()
    (path / "bin" / "hello").write_bytes(b"#!/bin/sh\necho hello\n")
    os.chmod(path / "bin" / "hello", 0o755)
    (path / "share" / "doc" / "README").write_text("read me\n")
    (path / "data.bin").write_bytes(bytes(range(256)) * 64)
    os.symlink("bin/hello", path / "run")
    return path


def open_store(cli) -> LocalStore:
    return LocalStore(str(cli.root), STORE_DIR)


def registered(cli) -> tuple[set[str], set[str]]:
    """(valid base names, entries of store/ other than .links)."""
    s = open_store(cli)
    try:
        return {i.path.base for i in s.all_paths()}, {e for e in os.listdir(s.store) if e != ".links"}
    finally:
        s.close()


# ---- add / cat / ls / hash -------------------------------------------------------------

def test_add_prints_physical_path(cli, tmp_path):
    src = make_pkg(tmp_path / "pkg")
    out = cli.out("add", src)
    assert len(out.splitlines()) == 1
    assert out.startswith(str(cli.physical_store) + "/") and out.endswith("-pkg")
    assert os.path.isdir(out) and scan(out).digest == scan(src).digest
    # adding again prints the same path; --name renames
    assert cli.out("add", src) == out
    named = cli.out("add", "--name", "hello-1.0", src)
    assert named.endswith("-hello-1.0") and named != out


def test_add_of_a_large_tree_shows_progress_on_a_terminal_only(cli, tmp_path):
    src = tmp_path / "tree"
    src.mkdir()
    for i in range(300):  # enough batches for the worker processes, and a bar
        (src / f"f{i}").write_bytes(os.urandom(40_000))
    code, out, shown = run_on_terminal(["add", src], cli.root)
    assert code == 0 and out.strip().startswith(str(cli.physical_store))
    assert "\r\x1b[Kadding tree [" in shown and "MiB / " in shown
    assert shown.endswith("\r\x1b[K")  # erased: the store path went to stdout
    (src / "new").write_text("x")
    assert "\r" not in cli("add", src, check=0).stderr


def test_add_json(cli, tmp_path):
    src = make_pkg(tmp_path / "pkg")
    rec = json.loads(cli.out("add", "--json", src))
    base = os.path.basename(rec["physical"])
    assert rec["path"] == f"{STORE_DIR}/{base}"
    assert rec["physical"] == str(cli.physical_store / base)
    assert rec["digest"] == format_digest(scan(src).digest)
    assert rec["hash"] == base[:32] and rec["name"] == "pkg" and rec["references"] == []
    assert rec["size"] == len(b"#!/bin/sh\necho hello\n") + 8 + 256 * 64



_NO_FAST = {"FIMIO_NO_FAST_PATH": "1"}


def test_add_without_click_says_what_the_click_command_says(cli, tmp_path):
    # `fimio add` parses its plain options itself (click's import is a third of a small
    # add); whatever it prints, and its exit code, must be the click command's
    src = make_pkg(tmp_path / "pkg")
    (tmp_path / "bad name").mkdir()
    other = tmp_path / "other-root"
    cases = [
        [src], ["--json", src], ["--name", "hello-1.0", src], [f"--name=x-{1}", "-q", src], ["-v", src],
        ["--root", other, src], [f"--root={other}", "--json", src], ["--store-dir", "/fimio/store", src],
        [tmp_path / "missing"], [tmp_path / "bad name"], ["--name", ".hidden", src], ["--name", "", src],
        ["--root", "", src],
    ]
    for args in cases:
        slow = cli("add", *args, env=_NO_FAST)
        fast = cli("add", *args)
        assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, slow.stderr), args
    assert cli("add", "--name", "hello-1.0", src).returncode == 0
    assert cli("add", tmp_path / "missing").returncode == 5


def test_add_falls_back_to_click_for_what_it_does_not_parse(cli, tmp_path):
    src = make_pkg(tmp_path / "pkg")
    assert "Usage: fimio add [OPTIONS] PATH" in cli("add", "--help", check=0).stdout
    assert_one_error_line(cli("add", "--bogus", src), 2, "No such option '--bogus'")
    assert "unexpected extra argument" in cli("add", src, src, check=2).stderr
    assert cli("add", "--name", check=2).stderr.startswith("fimio: error: Option '--name' requires an argument")
    assert cli.out("add", "-qq", src) == cli.out("add", src)  # stacked short flags: click's


def test_add_imports_neither_click_nor_dataclasses(cli, tmp_path):
    # the start-up cost of the commonest command: click and dataclasses (with inspect and
    # ast) are 40-50 ms of a 150 ms add (shutil is not asked about: a development
    # install's import hook loads it)
    src = make_pkg(tmp_path / "pkg")
    code = ("import sys; from fimio.cli import run\n"
            "assert run(['add', '--root', sys.argv[1], sys.argv[2]]) == 0\n"
            "print(sorted(m for m in ('click', 'dataclasses', 'inspect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, cli.root, src], capture_output=True, text=True, check=True,
                         env=fimio_env(cli.root))
    assert out.stdout.splitlines() == [str(cli.physical_store / os.path.basename(out.stdout.splitlines()[0])), "[]"]

def test_hash_equals_add_digest(cli, tmp_path):
    src = make_pkg(tmp_path / "pkg")
    digest = cli.out("hash", src)
    assert digest == format_digest(scan(src).digest)
    assert json.loads(cli.out("add", "--json", src))["digest"] == digest
    assert json.loads(cli.out("hash", "--json", src))["digest"] == digest
    # hash adds nothing
    f = tmp_path / "lonely"
    f.write_text("x")
    cli.out("hash", f)
    assert all(not b.endswith("-lonely") for b in registered(cli)[0])


def test_cat(cli, tmp_path):
    src = make_pkg(tmp_path / "pkg")
    p = cli.out("add", src)
    assert cli.out("cat", f"{p}/share/doc/README") == "read me"
    base = os.path.basename(p)
    assert cli("cat", f"{STORE_DIR}/{base}/bin/hello", check=0).stdout == "#!/bin/sh\necho hello\n"
    assert cli("cat", f"{base[:32]}/data.bin", check=0, text=False).stdout == bytes(range(256)) * 64
    assert cli("cat", f"{p}/run", check=0).stdout == "#!/bin/sh\necho hello\n"  # follows a link inside
    f = tmp_path / "single.txt"
    f.write_bytes(b"single file\n")
    assert cli("cat", cli.out("add", f), check=0).stdout == "single file\n"
    assert_one_error_line(cli("cat", p), 2, "directory")
    assert_one_error_line(cli("cat", f"{p}/nope"), 5, "nope")
    assert_one_error_line(cli("cat", "0" * 32), 5)


def test_cat_never_reads_outside_the_store_path(cli, tmp_path):
    """A store path that is a symlink (to a file or a directory outside the store) is stored
    as a symlink: cat refuses to follow it, directly or as the start of a sub-path; ls and
    dump show the symlink itself."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not in the store\n")
    for name, target in (("to-file", outside / "secret"), ("to-dir", outside)):
        os.symlink(target, tmp_path / name)
    to_file, to_dir = (cli.out("add", tmp_path / n) for n in ("to-file", "to-dir"))
    assert_one_error_line(cli("cat", to_file), 2, "leaves its store path")
    assert_one_error_line(cli("cat", f"{to_dir}/secret"), 2, "leaves its store path")
    assert cli.out("ls", to_file) == f"{os.path.basename(to_file)} -> {outside / 'secret'}"
    assert b"symlink" in cli("dump", to_dir, text=False, check=0).stdout



def test_cat_of_a_symlink_loop_is_bad_input(cli, tmp_path):
    loops = tmp_path / "loops"
    loops.mkdir()
    os.symlink("b", loops / "a")
    os.symlink("a", loops / "b")
    p = cli.out("add", loops)
    assert_one_error_line(cli("cat", f"{p}/a"), 2, f"'{p}/a' is a symlink loop", f"fimio ls -l {p}")

def test_ls(cli, tmp_path):
    p = cli.out("add", make_pkg(tmp_path / "pkg"))
    assert cli.out("ls", p).splitlines() == ["bin", "data.bin", "run -> bin/hello", "share"]
    assert cli.out("ls", "-R", p).splitlines() == [
        "bin", "bin/hello", "data.bin", "run -> bin/hello",
        "share", "share/doc", "share/doc/README", "share/empty",
    ]
    assert cli.out("ls", f"{p}/share").splitlines() == ["doc", "empty"]
    entries = {e["name"]: e for e in json.loads(cli.out("ls", "-R", "--json", p))}
    assert entries["bin/hello"]["type"] == "executable"
    assert entries["data.bin"] == {"name": "data.bin", "type": "regular", "size": 256 * 64, "target": None}
    assert entries["run"]["target"] == "bin/hello"


# ---- dump / restore against Nix ---------------------------------------------------------

@pytest.mark.nix
def test_dump_is_byte_identical_to_nix_over_the_corpus(cli, tmp_path):
    nix_available("nix-store")
    from treecorpus import make_corpus

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    samples = make_corpus(corpus)
    assert len(samples) >= 10
    for sample in samples:
        p = cli.out("add", sample)
        ours = cli("dump", p, check=0, text=False).stdout
        # Nix agrees with us on the original tree...
        nix_src = subprocess.run(["nix-store", "--dump", str(sample)], check=True, capture_output=True).stdout
        assert ours == nix_src, sample.name
        # ...and restoring our NAR with Nix and dumping it again gives the same bytes
        dest = tmp_path / "nix-restored" / sample.name
        dest.parent.mkdir(exist_ok=True)
        subprocess.run(["nix-store", "--restore", str(dest)], input=ours, check=True)
        again = subprocess.run(["nix-store", "--dump", str(dest)], check=True, capture_output=True).stdout
        assert again == ours, sample.name
        # and our restore of it hashes to the digest add printed
        mine = tmp_path / "fimio-restored" / sample.name
        mine.parent.mkdir(exist_ok=True)
        cli("restore", mine, input=ours, check=0)
        assert cli.out("hash", mine) == json.loads(cli.out("path-info", "--json", p))[0]["digest"], sample.name


def test_restore_from_stdin(cli, tmp_path):
    src = make_pkg(tmp_path / "pkg")
    p = cli.out("add", src)
    nar = cli("dump", f"{os.path.basename(p)[:32]}", check=0, text=False).stdout
    assert nar.startswith(b"\x0d\x00\x00\x00\x00\x00\x00\x00nix-archive-1")
    dest = tmp_path / "out"
    cli("restore", dest, input=nar, check=0)
    assert scan(dest).digest == scan(src).digest
    assert os.readlink(dest / "run") == "bin/hello"
    assert os.stat(dest / "bin" / "hello").st_mode & 0o100
    # a sub-path dumps alone
    sub = cli("dump", f"{p}/share/doc/README", check=0, text=False).stdout
    cli("restore", tmp_path / "readme", input=sub, check=0)
    assert (tmp_path / "readme").read_text() == "read me\n"
    # any valid name, even one whose temporary sibling would be over NAME_MAX
    cli("restore", tmp_path / ("r" * 250), input=sub, check=0)
    assert (tmp_path / ("r" * 250)).read_text() == "read me\n"
    assert sorted(os.listdir(tmp_path)) == sorted(["pkg", "root", "out", "readme", "r" * 250])


def test_a_killed_restore_leaves_nothing_the_next_restore_keeps(cli, tmp_path):
    """A restore (or export) killed half-way leaves its hidden temp sibling; the next one to
    the same name removes such leftovers of dead processes, and only those."""
    import subprocess

    src = make_pkg(tmp_path / "pkg")
    nar = cli("dump", cli.out("add", src), check=0, text=False).stdout
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".r3.tmp-{dead.pid}-0badc0de"
    (stale / "bin").mkdir(parents=True)
    (stale / "bin" / "partial").write_bytes(b"x" * 1000)
    (stale / "bin").chmod(0o555)
    live = out / f".r3.tmp-{os.getpid()}-0badc0de"  # a live process's: never touched
    live.write_text("in progress\n")
    cli("restore", out / "r3", input=nar, check=0)
    assert sorted(os.listdir(out)) == sorted(["r3", live.name])
    assert scan(out / "r3").digest == scan(src).digest


# ---- path-info / query ------------------------------------------------------------------

def _graph(cli, tmp_path):
    """lib (a tree) <- mid (text) <- top (text); returns physical paths."""
    lib = cli.out("add", make_pkg(tmp_path / "lib"))
    s = open_store(cli)
    try:
        lib_p = s.resolve(lib)[0]
        mid = s.add_text("mid.txt", b"uses " + s.logical(lib_p).encode(), [lib_p]).path
        top = s.add_text("top.txt", b"uses mid and lib", [mid, lib_p]).path
        return lib, s.physical(mid), s.physical(top)
    finally:
        s.close()


def test_path_info(cli, tmp_path):
    lib, mid, top = _graph(cli, tmp_path)
    lib_size = len(b"#!/bin/sh\necho hello\n") + 8 + 256 * 64
    mid_size = len(b"uses " + STORE_DIR.encode()) + 1 + len(os.path.basename(lib))
    top_size = len(b"uses mid and lib")
    assert cli.out("path-info", top) == f"{top}\t{top_size}"
    assert cli.out("path-info", "-S", top) == f"{top}\t{top_size}\t{top_size + mid_size + lib_size}"
    lines = cli.out("path-info", "-r", top).splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted([lib, mid, top], key=os.path.basename)
    [rec] = json.loads(cli.out("path-info", "--json", "-S", top))
    assert rec["closureSize"] == top_size + mid_size + lib_size
    assert sorted(rec["references"]) == sorted(f"{STORE_DIR}/{os.path.basename(x)}" for x in (lib, mid))
    assert rec["physical"] == top and rec["ca"] == "text"
    assert len(json.loads(cli.out("path-info", "--json", "-r", top))) == 3
    # logical path and hash part are accepted too
    assert cli.out("path-info", f"{STORE_DIR}/{os.path.basename(mid)}").split("\t")[0] == mid
    assert cli.out("path-info", os.path.basename(lib)[:32]).split("\t")[0] == lib
    assert_one_error_line(cli("path-info", "0" * 32), 5)


def test_query(cli, tmp_path):
    lib, mid, top = _graph(cli, tmp_path)
    by_base = lambda *ps: sorted(ps, key=os.path.basename)  # noqa: E731
    assert cli.out("query", "--references", top).splitlines() == by_base(lib, mid)
    assert cli.out("query", "--references", lib) == ""
    assert cli.out("query", "--referrers", lib).splitlines() == by_base(mid, top)
    assert cli.out("query", "--referrers", top) == ""
    # as nix-store -qR: references before referrers (lib <- mid <- top, and top -> lib)
    assert cli.out("query", "--requisites", top).splitlines() == [lib, mid, top]
    assert cli.out("query", "--requisites", mid).splitlines() == [lib, mid]
    tree = cli.out("query", "--tree", top).splitlines()
    assert tree[0] == top and len(tree) == 4  # top, its two refs, and lib again under mid
    assert any(line.endswith(lib) or line.endswith(f"{lib} [...]") for line in tree[1:])
    assert {line.lstrip("│├└─ ").removesuffix(" [...]") for line in tree} == {lib, mid, top}
    [t] = json.loads(cli.out("query", "--tree", "--json", top))
    assert t["path"] == f"{STORE_DIR}/{os.path.basename(top)}" and len(t["references"]) == 2
    assert t["physical"] == top and {r["physical"] for r in t["references"]} == {lib, mid}
    reqs = json.loads(cli.out("query", "--requisites", "--json", top))
    assert {r["physical"] for r in reqs} == {lib, mid, top}
    assert_one_error_line(cli("query", top), 2)
    assert_one_error_line(cli("query", "--references", "--tree", top), 2, "exactly one")


# ---- verify -----------------------------------------------------------------------------

def test_verify_clean_store(cli, tmp_path):
    _graph(cli, tmp_path)
    proc = cli("verify", "--check-contents", check=0)
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    cli("verify", check=0)
    assert json.loads(cli.out("verify", "--json"))["ok"] is True


def test_verify_finds_a_flipped_byte(cli, tmp_path):
    p = pathlib.Path(cli.out("add", make_pkg(tmp_path / "pkg")))
    victim = p / "data.bin"
    mode = stat.S_IMODE(os.stat(victim).st_mode)
    os.chmod(victim, mode | stat.S_IWUSR)
    with open(victim, "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0x01]))
    os.chmod(victim, mode)
    cli("verify", check=0)  # without --check-contents nothing is rehashed
    proc = cli("verify", "--check-contents")
    assert_one_error_line(proc, 4)
    logical = f"{STORE_DIR}/{p.name}"
    assert f"{p}/data.bin: contents differ" in proc.stdout  # physical on stdout, as every path printed
    assert len(proc.stdout.splitlines()) == 1
    problems = json.loads(cli("verify", "--check-contents", "--json", check=4).stdout)["problems"]
    assert [x["file"] for x in problems] == ["data.bin"]
    assert [(x["path"], x["physical"]) for x in problems] == [(logical, str(p))]


def test_verify_refuses_a_bad_substituter_url_even_with_nothing_to_repair(cli):
    for extra in ([], ["--repair"]):
        assert_one_error_line(cli("verify", *extra, "--substituter", "ftp://x"), 2, "ftp://x")


def test_verify_finds_a_deleted_file(cli, tmp_path):
    p = pathlib.Path(cli.out("add", make_pkg(tmp_path / "pkg")))
    d = p / "share" / "doc"
    os.chmod(d, 0o755)
    os.unlink(d / "README")
    os.chmod(d, 0o555)
    proc = cli("verify", "--check-contents")
    assert_one_error_line(proc, 4)
    assert f"{p}/share/doc/README: is missing" in proc.stdout.splitlines()


def test_verify_finds_a_deleted_path(cli, tmp_path):
    p = pathlib.Path(cli.out("add", make_pkg(tmp_path / "pkg")))
    os.chmod(p, 0o755)
    shutil.rmtree(p, ignore_errors=False, onerror=lambda f, path, e: (os.chmod(os.path.dirname(path), 0o755), f(path)))
    proc = cli("verify")
    assert_one_error_line(proc, 4)
    assert f"{p}: is registered but missing on disk" in proc.stdout



def test_verify_finds_a_path_left_writable_unless_its_writer_holds_it(cli, tmp_path):
    # a writer killed while it lent a directory write permission (to move it) leaves it so
    from fimio.store import fsutil

    p = pathlib.Path(cli.out("add", make_pkg(tmp_path / "pkg")))
    f = pathlib.Path(cli.out("add", tmp_path / "pkg" / "data.bin"))
    os.chmod(p, 0o755)
    os.chmod(f, 0o644)
    proc = cli("verify")
    assert_one_error_line(proc, 4)
    assert f"{p}: has mode 0755, not read-only: it was changed" in proc.stdout.splitlines()
    assert f"{f}: has mode 0644, not read-only: it was changed" in proc.stdout.splitlines()
    os.chmod(f, 0o444)
    with fsutil.file_lock(str(cli.root / "locks" / (p.name[:32] + ".lock"))):  # a writer at work on it
        assert cli("verify").returncode == 0
    os.chmod(p, 0o555)
    assert cli("verify").returncode == 0

@pytest.mark.parametrize("damage", [b"{not json", b'{"path": "x", "root": "zz"}', b"[]"])
def test_a_damaged_path_record_is_reported_never_a_traceback(cli, tmp_path, damage):
    """A path record the database cannot decode: verify names it (exit 4) and keeps the
    path's files; a command that reads that record fails with one line (exit 4); the other
    paths still work."""
    victim = pathlib.Path(cli.out("add", make_pkg(tmp_path / "pkg")))
    (tmp_path / "other.txt").write_text("other\n")
    other = cli.out("add", tmp_path / "other.txt")
    store = open_store(cli)
    try:
        with store.db.write() as txn:
            txn.put(victim.name[:32].encode(), damage, db=store.db.dbs["paths"])
    finally:
        store.close()
    proc = cli("verify")
    assert_one_error_line(proc, 4)
    assert proc.stdout == f"{cli.physical_store}/{victim.name[:32]}…: has a damaged record in the database\n"
    assert (victim / "data.bin").exists()  # not removed as garbage
    repair = cli("verify", "--repair")  # says why it leaves the record as it is
    assert_one_error_line(repair, 4)
    assert "has a damaged record in the database (not repaired: repair fetches files, not database records" \
        in repair.stdout, repair.stdout
    assert_one_error_line(cli("path-info", victim), 4, "damaged")
    assert cli.out("path-info", other).startswith(other)


# ---- bad input (contract acceptance 6) ---------------------------------------------------

def test_add_nonexistent_path(cli, tmp_path):
    """A file a command should read that does not exist is "not found" (5), for add and hash
    as for realise of a derivation file or import of a bundle."""
    proc = cli("add", tmp_path / "does-not-exist")
    assert_one_error_line(proc, 5, "does-not-exist")
    assert proc.stdout == ""
    assert_one_error_line(cli("hash", tmp_path / "does-not-exist"), 5, "does-not-exist")


def test_a_closed_stderr_never_sends_messages_into_the_results(cli, tmp_path):
    """With fd 2 closed, messages must not fall back to stdout (a script's `$(...)` would
    take them for results), nor may a file fimio opens land on fd 2."""
    (tmp_path / "f.txt").write_text("f\n")
    no_stderr = dict(preexec_fn=lambda: os.close(2))
    added = cli("add", tmp_path / "f.txt", **no_stderr)
    assert added.returncode == 0 and added.stdout.strip() == str(cli.physical_store / os.listdir(cli.physical_store)[0])
    missing = cli("path-info", "--json", tmp_path / "gone", **no_stderr)
    assert (missing.returncode, missing.stdout, missing.stderr) == (5, "", "")
    fail = tmp_path / "fail.toml"
    fail.write_text('name = "fail"\nbuilder = "/bin/sh"\nargs = ["-c", "echo oops; exit 3"]\n')
    proc = cli("realise", "--json", "--no-out-link", fail, **no_stderr)
    assert proc.returncode == 1 and json.loads(proc.stdout)["ok"] is False


def test_closed_stdout_or_stdin_is_no_traceback_and_not_silent(cli, tmp_path):
    (tmp_path / "f.txt").write_text("f\n")
    path = cli.out("add", tmp_path / "f.txt")
    for args in (["add", tmp_path / "f.txt"], ["path-info", "--json", path], ["cat", path]):
        proc = cli(*args, preexec_fn=lambda: os.close(1))
        assert proc.returncode == 0 and proc.stderr.startswith("fimio: warning: standard output is closed"), proc.stderr
    sk = cli.out("key", "generate", "k-1")
    proc = cli("key", "public", preexec_fn=lambda: os.close(0))
    assert_one_error_line(proc, 2, "no secret key on stdin")
    assert cli.out("key", "public", input=sk + "\n").startswith("k-1:")


def _drop_root_read_bypass() -> list[str]:
    """A command prefix under which root is subject to file permissions like anyone else."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is not installed: cannot make a file unreadable")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", "--bounding-set", caps, "--inh-caps", caps]


@pytest.mark.parametrize("what", ["file", "directory"])
def test_add_unreadable(cli, tmp_path, what):
    prefix = _drop_root_read_bypass()
    src = make_pkg(tmp_path / "pkg")
    victim = src / "share" / "doc" / ("README" if what == "file" else "")
    victim = victim if what == "file" else src / "share" / "doc"
    os.chmod(victim, 0)
    try:
        if subprocess.run([*prefix, "cat" if what == "file" else "ls", str(victim)],
                          capture_output=True).returncode == 0:
            pytest.skip("this environment can read a mode-000 file even with the capabilities dropped")
        before = registered(cli)
        proc = cli("add", src, prefix=prefix)
        assert_one_error_line(proc, 2, str(victim.relative_to(tmp_path)), "permission denied")
        assert proc.stdout == ""
        assert registered(cli) == before == (set(), set())
    finally:
        os.chmod(victim, 0o755)


def test_add_tree_with_a_socket(cli, tmp_path):
    first = cli.out("add", make_pkg(tmp_path / "first"))
    before = registered(cli)
    assert before == ({os.path.basename(first)}, {os.path.basename(first)})
    src = make_pkg(tmp_path / "pkg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "share" / "control.sock"))
    try:
        proc = cli("add", src)
    finally:
        sock.close()
    assert_one_error_line(proc, 2, "control.sock", "socket")
    assert proc.stdout == ""
    assert registered(cli) == before
    assert cli.out("path-info", "-r", first).split("\t")[0] == first
    cli("verify", "--check-contents", check=0)


@pytest.mark.parametrize("name", [".hidden", "a b", "", "x/y", "é"])
def test_add_invalid_name(cli, tmp_path, name):
    src = make_pkg(tmp_path / "pkg")
    proc = cli("add", "--name", name, src)
    assert_one_error_line(proc, 2, "invalid store path name")
    assert proc.stdout == "" and registered(cli) == (set(), set())


def test_add_invalid_default_name_needs_name(cli, tmp_path):
    src = make_pkg(tmp_path / "my package")
    assert_one_error_line(cli("add", src), 2, "my package", "give one with --name")
    assert cli.out("add", "--name", "my-package", src).endswith("-my-package")


def test_a_file_path_that_does_not_exist_is_not_found(cli, tmp_path):
    """./nope is a missing file, not a bad store-path name; ./result/nope is a missing file
    inside the store path the out-link points to."""
    src = make_pkg(tmp_path / "pkg")
    p = cli.out("add", src)
    os.symlink(p, tmp_path / "result")
    for args in (["path-info", "./nope"], ["log", "./nope"], ["cat", "./result/nope"], ["cat", "./nope/x"]):
        proc = cli(*args, cwd=tmp_path)
        assert_one_error_line(proc, 5, "does not exist")
    assert cli("cat", "./result/share/doc/README", cwd=tmp_path, check=0).stdout == "read me\n"
    # ".." after a missing part is taken as the file system takes it
    (tmp_path / "other.txt").write_text("other\n")
    other = cli.out("add", tmp_path / "other.txt")
    detour = f"{p}/no-such-dir/../../{os.path.basename(other)}"
    assert cli.out("path-info", detour).split("\t")[0] == other
    assert_one_error_line(cli("path-info", f"{p}/.."), 5, "not in the store")


def test_bad_flag_and_bad_store_path(cli, tmp_path):
    cli("verify", check=0)  # an empty store
    assert_one_error_line(cli("add", "--no-such-flag", tmp_path), 2)
    # click's suggestion becomes part of the one hint, with no stray period before it
    proc = cli("realise", "--chek", tmp_path)
    assert_one_error_line(proc, 2)
    assert proc.stderr.strip() == ("fimio: error: No such option '--chek' (did you mean one of: '--check', "
                                   "'--cores', '--help'? see 'fimio realise --help')")
    assert_one_error_line(cli("ls", "not-a-store-path"), 2)
    assert_one_error_line(cli("cat", str(tmp_path)), 5, str(tmp_path))


@pytest.mark.parametrize("args,needle", [([], "realise"), (["key"], "generate")])
def test_a_group_without_its_command_shows_its_help(cli, args, needle):
    """`fimio` or `fimio key` alone: the help (as a page, not squeezed into an error line),
    exit 2 (bad usage)."""
    proc = cli(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("Usage: fimio") and "fimio: error" not in proc.stderr
    assert "\nCommands:\n" in proc.stderr and needle in proc.stderr


def test_every_command_has_a_help_page(cli):
    listing = cli("--help", check=0).stdout
    commands = [line.split()[0] for line in listing.split("Commands:\n", 1)[1].splitlines() if line.strip()]
    assert len(commands) > 25
    for command in commands:
        page = cli(command, "--help", check=0).stdout
        assert page.startswith(f"Usage: fimio {command}") and "Options:" in page, command


@pytest.mark.parametrize("store_dir", ["relative/store", "/a//b", "/a/../b", "/", "/usr", "/usr/store", "/build",
                                       "/proc/x"])
def test_a_store_directory_a_build_could_not_use_is_refused(cli, tmp_path, store_dir):
    (tmp_path / "f").write_text("x\n")
    assert_one_error_line(cli("add", "--store-dir", store_dir, tmp_path / "f"), 2, "invalid store directory")
    assert not (cli.root / "db").exists()


def test_a_store_directory_of_its_own_is_accepted(cli, tmp_path):
    (tmp_path / "f").write_text("x\n")
    path = cli.out("add", "--store-dir", "/opt/fimio-store/", tmp_path / "f")
    [info] = json.loads(cli.out("path-info", "--json", "--store-dir", "/opt/fimio-store", path))
    assert path.startswith(str(cli.physical_store)) and info["path"].startswith("/opt/fimio-store/")


def test_a_mistyped_root_is_no_store_for_commands_that_only_read(tmp_path):
    """`fimio path-info --root /typo/x P` says there is no store there; it does not create one."""
    missing = tmp_path / "typo" / "root"
    for args in (["path-info", "abc"], ["ls", "abc"], ["roots"], ["log", "x.toml"]):
        proc = run_fimio(args, missing)
        assert_one_error_line(proc, 5, "no store at")
    assert not (tmp_path / "typo").exists()


def _hinted_errors(tmp_path) -> dict:
    """Bad inputs from different parts of fimio: ``name: (argv, stdin, exit code)``."""
    (tmp_path / "bad.toml").write_text('name = "x"\nargs = [,]\n')
    (tmp_path / "exists").mkdir(exist_ok=True)
    (tmp_path / "empty-cache").mkdir(exist_ok=True)
    a_file = tmp_path / "bad.toml"
    return {
        "invalid TOML": (["realise", a_file], None, 2),
        "not a NAR": (["restore", tmp_path / "new"], b"garbage", 4),
        "restore target exists": (["restore", tmp_path / "exists"], b"", 2),
        "unreadable key file": (["push", f"file://{tmp_path / 'c'}", "--key", tmp_path / "no-key", "."], None, 2),
        "hash in no cache": (["copy", "--from", f"file://{tmp_path / 'empty-cache'}", "0" * 32], None, 5),
    }


@pytest.mark.parametrize("case", ["invalid TOML", "not a NAR", "restore target exists", "unreadable key file",
                                  "hash in no cache"])
def test_an_error_line_says_what_to_do(cli, tmp_path, monkeypatch, case):
    """'fimio: error: <what> (<hint>)': each error carries its hint, not only its what."""
    argv, stdin, code = _hinted_errors(tmp_path)[case]
    monkeypatch.chdir(cli.out("add", tmp_path / "exists"))  # a store, and a path in it: "."
    line = assert_one_error_line(cli(*argv, input=stdin, text=stdin is None), code)
    assert line.endswith(")") and " (" in line, line


@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_hash_flat_gives_what_a_fetch_declares(cli, tmp_path, algo):
    """`hash --flat` is the digest of a file's bytes, the form [fetch] hash takes (the plain
    `hash` is the tree digest, which differs): a fetch declaring it realises."""
    data = tmp_path / "data.txt"
    data.write_bytes(b"pinned bytes\n")
    flat = cli.out("hash", "--flat", "--type", algo, data)
    assert flat.startswith(f"{algo}:") and flat != cli.out("hash", data)
    fod = tmp_path / "fod.toml"
    fod.write_text(f'name = "data.txt"\n[fetch]\nurl = "file://{data}"\nhash = "{flat}"\n')
    out = cli.out("realise", "--no-out-link", fod)
    assert open(out, "rb").read() == b"pinned bytes\n"
    assert json.loads(cli.out("hash", "--flat", "--json", "--type", algo, data)) == \
        {"path": str(data), "digest": flat, "size": 13}
    assert_one_error_line(cli("hash", "--flat", tmp_path), 2, "is not a file")
    os.mkfifo(tmp_path / "fifo")  # refused before it is opened: an open would wait for a writer
    assert_one_error_line(cli("hash", "--flat", tmp_path / "fifo", timeout=20), 2, "is not a file")


@pytest.mark.parametrize("loss", ["emptied", "removed"])
def test_a_lost_database_never_makes_the_store_garbage(cli, tmp_path, loss):
    """A database found missing or empty while store/ holds paths is not started afresh:
    every path would look unregistered, and verify or gc would delete them all."""
    p = pathlib.Path(cli.out("add", make_pkg(tmp_path / "pkg")))
    db = cli.root / "db"
    if loss == "emptied":
        (db / "data.mdb").write_bytes(b"")
    else:
        shutil.rmtree(db)
    for command in (["verify"], ["gc"], ["add", tmp_path / "pkg"]):
        assert_one_error_line(cli(*command), 4, "is missing or empty, but the store holds paths")
    assert (p / "data.bin").exists(), "a path was deleted"


def test_a_blob_chmod_ed_through_a_store_path_is_not_reused(cli, tmp_path):
    """A store file is its blob: a chmod of one (by hand, as root) damages the blob. A later
    add of the same contents gets a fresh, normal blob; verify names only the damaged path."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "f").write_text("same contents\n")
    a = pathlib.Path(cli.out("add", tmp_path / "a"))
    os.chmod(a / "f", 0o555)
    b = pathlib.Path(cli.out("add", tmp_path / "b"))
    assert stat.S_IMODE(os.stat(b / "f").st_mode) == 0o444 and not os.path.samefile(a / "f", b / "f")
    proc = cli("verify", "--check-contents")
    assert_one_error_line(proc, 4)
    assert [line.split(":")[0] for line in proc.stdout.splitlines()] == [f"{a}/f"], proc.stdout


@pytest.mark.parametrize("size", [100, 8192, 12288])
def test_a_truncated_database_is_one_error_line_not_a_crash(cli, tmp_path, size):
    """LMDB maps its file: one cut short would make every command die of SIGBUS."""
    for i in range(3):
        (tmp_path / f"f{i}").write_text(f"{i}\n" * 1000)
        cli.out("add", tmp_path / f"f{i}")
    drv = tmp_path / "d.toml"
    drv.write_text('name = "d"\nbuilder = "/bin/sh"\nargs = ["-c", "echo > $out"]\n')
    cli.out("realise", "--no-out-link", drv)
    os.truncate(cli.root / "db" / "data.mdb", size)
    # (realise: its outputs are valid, so the no-op fast path, which maps the file itself, is tried)
    for command in (["verify"], ["gc"], ["add", tmp_path / "f0"], ["realise", "--no-out-link", drv]):
        assert_one_error_line(cli(*command), 4, "is truncated", "restore the database")


def test_verify_shows_each_problem_on_one_line_whatever_the_name(cli, tmp_path):
    d = tmp_path / "odd"
    d.mkdir()
    for name in (b"new\nline", b"bad\xff"):
        with open(os.path.join(os.fsencode(d), name), "wb") as f:
            f.write(b"contents\n")
    p = cli.out("add", d)
    for name in (b"new\nline", b"bad\xff"):
        victim = os.path.join(os.fsencode(p), name)
        os.chmod(victim, 0o644)
        with open(victim, "r+b") as f:
            f.write(b"C")
    proc = cli("verify", "--check-contents")
    assert_one_error_line(proc, 4)
    lines = sorted(proc.stdout.splitlines())
    assert [line.partition(": ")[0] for line in lines] == [f'{p}/"bad\\xff"', f'{p}/"new\\nline"'], lines


def test_an_error_naming_a_non_utf8_file_shows_its_bytes(cli, tmp_path):
    missing = os.fsencode(tmp_path) + b"/d\xe9ir/nothere"
    proc = subprocess.run([os.fsencode(fimio_executable()), b"add", missing], env=fimio_env(cli.root),
                          capture_output=True)
    assert proc.returncode == 5
    assert b"d\\xe9ir/nothere" in proc.stderr and b"udce9" not in proc.stderr, proc.stderr
