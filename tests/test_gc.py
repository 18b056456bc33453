"""Garbage collection acceptance: ``fimio gc`` and ``fimio roots`` with real builds.

A collection running while a realise builds deletes nothing that realise uses; afterwards
exactly what no root reaches goes; out-links root closures; ``--dry-run``;
``--max-freed``; the ``.links`` blobs of deleted paths go too; ``verify`` stays clean.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import blake3
import pytest

from conftest import STORE_DIR, fimio_env, fimio_executable
from test_sandbox import out_of, outputs_of, realise_json, write_drv


def valid(cli, logical) -> bool:
    proc = cli("path-info", logical)
    assert proc.returncode in (0, 5), proc.stderr
    return proc.returncode == 0


def gc(cli, *args) -> dict:
    """``fimio gc --json``, with ``deleted`` reduced to the logical paths (after checking that
    each entry names the path's physical location too)."""
    result = json.loads(cli.out("gc", "--json", *args))
    for entry in result["deleted"]:
        assert entry["physical"] == str(cli.physical_store / os.path.basename(entry["path"]))
    result["deleted"] = [entry["path"] for entry in result["deleted"]]
    return result


def add(cli, path) -> str:
    """``fimio add``; the logical path."""
    return f"{STORE_DIR}/{os.path.basename(cli.out('add', path))}"


@contextlib.contextmanager
def keeping_temp_roots(store):
    """``store`` keeps temp roots for the block, as the commands that read it do."""
    from fimio.store.roots import TempRoots

    store.temp_roots = TempRoots(store)
    try:
        yield
    finally:
        store.temp_roots.close()
        store.temp_roots = None


def assert_verify_clean(cli):
    proc = cli("verify", check=0)
    assert proc.stdout == "", proc.stdout
    cli("verify", "--check-contents", check=0)


def test_gc_during_a_realise_deletes_nothing_it_uses(cli, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x").write_text("input data\n")
    dep = write_drv(tmp_path / "dep.toml", "dep", "echo dep-output > $out")
    slow = write_drv(tmp_path / "slow.toml", "slow", """
        sleep 3
        mkdir $out
        cat $data/x $dep > $out/result
        echo $dep > $out/dep-path
        """, inputs={"data": {"path": "data"}, "dep": {"drv": "dep.toml"}})
    (tmp_path / "junk").write_text("nobody needs this\n")
    junk = add(cli, tmp_path / "junk")
    dep_out = out_of(realise_json(cli, dep))[0]  # valid, and not rooted by anything

    (rec,) = json.loads(cli.out("instantiate", "--json", slow))
    slow_drv, slow_out = rec["drvPath"], rec["outputs"]["out"]["path"]
    dep_drv = json.loads(pathlib.Path(rec["physical"]).read_bytes())["inputs"]["dep"]["drv"]
    data_src = json.loads(pathlib.Path(rec["physical"]).read_bytes())["inputs"]["data"]["src"]
    in_use = {dep_out, dep_drv, slow_drv, data_src}
    assert all(valid(cli, p) for p in in_use | {junk})

    work = tmp_path / "work"
    work.mkdir()
    realise = subprocess.Popen([fimio_executable(), "realise", "--json", slow], cwd=work,
                               env=fimio_env(cli.root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not any(e.startswith("build-") for e in os.listdir(cli.root / "tmp")):
            assert realise.poll() is None, realise.communicate()
            assert time.monotonic() < deadline, "the slow build never started"
            time.sleep(0.05)
        during = gc(cli)
        assert realise.poll() is None, "the build should still be running during the collection"
        # the realise's temp roots are listed by `fimio roots`
        roots = json.loads(cli.out("roots", "--json"))
        assert {p["path"] for k, p in roots.items() if k.startswith("(temp)")} >= in_use
    finally:
        out, err = realise.communicate(timeout=60)
    assert realise.returncode == 0, err
    assert junk in during["deleted"]
    assert not set(during["deleted"]) & in_use, during["deleted"]
    assert all(valid(cli, p) for p in in_use)
    result = pathlib.Path(out_of(json.loads(out))[1])
    assert (result / "result").read_text() == "input data\ndep-output\n"

    # once the realise is over: what ./result reaches stays (its outputs through references,
    # their .drv files and so their sources as derivers of live outputs), the rest goes
    after = gc(cli)
    assert valid(cli, slow_out) and valid(cli, dep_out)  # dep_out through the reference
    assert after["deleted"] == []
    assert all(valid(cli, p) for p in (slow_drv, dep_drv, data_src)) and not valid(cli, junk)
    assert_verify_clean(cli)

    # removing the out-link makes its closure collectable
    os.unlink(work / "result")
    last = gc(cli)
    assert set(last["deleted"]) == {slow_out, dep_out, slow_drv, dep_drv, data_src}
    assert not valid(cli, slow_out) and not valid(cli, dep_out)
    assert [e for e in os.listdir(cli.physical_store) if e != ".links"] == []
    assert os.listdir(cli.physical_store / ".links") == []
    assert_verify_clean(cli)


def test_dry_run_deletes_nothing(cli, tmp_path):
    paths = []
    for i in range(3):
        (tmp_path / f"f{i}").write_text(f"file {i}\n")
        paths.append(add(cli, tmp_path / f"f{i}"))
    links = sorted(os.listdir(cli.physical_store / ".links"))
    dry = gc(cli, "--dry-run")
    assert dry["dryRun"] is True and sorted(dry["deleted"]) == sorted(paths)
    assert dry["freed"] == sum(len(f"file {i}\n") for i in range(3))
    assert all(valid(cli, p) for p in paths)
    assert sorted(os.listdir(cli.physical_store / ".links")) == links
    # plain output: the physical paths that would go, one per line, and a summary on stderr
    proc = cli("gc", "--dry-run", check=0)
    assert sorted(proc.stdout.splitlines()) == sorted(str(cli.physical_store / os.path.basename(p)) for p in paths)
    assert "would delete 3 paths" in proc.stderr
    real = gc(cli)
    assert sorted(real["deleted"]) == sorted(paths) and real["dryRun"] is False
    assert not any(valid(cli, p) for p in paths)


def test_max_freed(cli, tmp_path):
    paths = []
    for i in range(4):
        (tmp_path / f"f{i}").write_bytes(bytes([65 + i]) * 1000)
        paths.append(add(cli, tmp_path / f"f{i}"))
    first = gc(cli, "--max-freed", "1")
    assert len(first["deleted"]) == 1 and first["freed"] == 1000 and first["kept"] == 3
    second = gc(cli, "--max-freed", "1K")  # 1024 bytes: stops once that much is freed
    assert len(second["deleted"]) == 2 and second["freed"] == 2000
    assert sum(valid(cli, p) for p in paths) == 1
    assert gc(cli)["freed"] == 1000
    assert_verify_clean(cli)
    for bad in ("lots", ""):  # an empty size is no "no limit"
        proc = cli("gc", "--max-freed", bad)
        assert proc.returncode == 2 and "invalid size" in proc.stderr


def test_links_blobs_of_deleted_paths_are_removed(cli, tmp_path):
    (tmp_path / "doomed").mkdir()
    (tmp_path / "doomed" / "only-here").write_text("unique to the doomed path\n")
    (tmp_path / "doomed" / "shared").write_text("shared content\n")
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "shared").write_text("shared content\n")
    doomed = add(cli, tmp_path / "doomed")
    kept = add(cli, tmp_path / "kept")
    # root `kept` by hand, the way out-links do it: a symlink in $ROOT/gcroots
    os.symlink(cli.physical_store / os.path.basename(kept), cli.root / "gcroots" / "by-hand")
    links = cli.physical_store / ".links"
    unique = links / blake3.blake3(b"unique to the doomed path\n").hexdigest()
    shared = links / blake3.blake3(b"shared content\n").hexdigest()
    assert unique.exists() and shared.exists()
    r = gc(cli)
    assert r["deleted"] == [doomed]
    assert not unique.exists()
    assert shared.exists() and valid(cli, kept)
    assert (cli.physical_store / os.path.basename(kept) / "shared").read_text() == "shared content\n"
    assert_verify_clean(cli)
    os.unlink(cli.root / "gcroots" / "by-hand")
    gc(cli)
    assert os.listdir(links) == []


def test_roots_keep_closures_and_built_outputs_without_roots_go(cli, tmp_path):
    write_drv(tmp_path / "lib.toml", "lib", "echo lib > $out")
    app = write_drv(tmp_path / "app.toml", "app", "mkdir $out; echo $lib > $out/uses", inputs={"lib": {"drv": "lib.toml"}})
    other = write_drv(tmp_path / "other.toml", "other", "echo other > $out")
    work = tmp_path / "w"
    work.mkdir()
    r = json.loads(cli.out("realise", "--json", app, cwd=work))
    app_out = out_of(r)[0]
    lib_out = outputs_of(cli, tmp_path / "lib.toml")["out"]
    other_out = out_of(realise_json(cli, other))[0]  # --no-out-link: unrooted
    deleted = set(gc(cli)["deleted"])
    assert other_out in deleted
    assert app_out not in deleted and lib_out not in deleted
    assert valid(cli, app_out) and valid(cli, lib_out) and not valid(cli, other_out)
    # a live output keeps the .drv that built it (as Nix's keep-derivations), and so its
    # input derivations; the unrooted one's goes
    app_drv, other_drv = r["targets"][0]["drvPath"], json.loads(cli.out("instantiate", "--json", other))[0]["drvPath"]
    lib_drv = json.loads(cli.out("instantiate", "--json", tmp_path / "lib.toml"))[0]["drvPath"]
    assert app_drv not in deleted and lib_drv not in deleted and other_drv in deleted
    cli("realise", "--no-out-link", "--check", app_drv.rsplit("/", 1)[1][:32], check=0)
    # realising again rebuilds the deleted output
    again = realise_json(cli, other)
    assert again["built"] == [again["targets"][0]["drvPath"]]
    assert_verify_clean(cli)


def test_instantiate_concurrent_with_gc_keeps_what_it_adds(cli, tmp_path, store):
    from fimio.store.gc import collect

    lines = ['name = "top"', 'builder = "/bin/sh"', "[inputs]"]
    for i in range(120):
        (tmp_path / "srcs" / f"s{i}").mkdir(parents=True)
        (tmp_path / "srcs" / f"s{i}" / "f").write_text(f"{i}\n")
        lines.append(f's{i} = {{ path = "srcs/s{i}" }}')
    (tmp_path / "top.toml").write_text("\n".join(lines) + "\n")
    run_of: dict[str, int] = {}
    done = threading.Event()

    def collector():  # collect as fast as possible while instantiate runs
        n = 0
        while not done.is_set():
            n += 1
            for p in collect(store).deleted:
                run_of[p] = n

    t = threading.Thread(target=collector)
    t.start()
    try:
        drv = cli.out("instantiate", tmp_path / "top.toml")
    finally:
        done.set()
        t.join()
    for p in collect(store).deleted:  # now that instantiate is over, everything it added goes
        run_of.setdefault(p, 10**9)
    drv_run = run_of[f"{STORE_DIR}/{os.path.basename(drv)}"]
    early = sorted(p for p, n in run_of.items() if n < drv_run)
    assert early == [], f"{len(early)} sources were deleted while instantiate was still using them"


def test_noop_realise_roots_its_output_atomically_with_respect_to_gc(cli, tmp_path):
    """A no-op realise with an out-link waits while a collection holds the GC lock.

    Otherwise it could find the output valid, a GC could then delete it (nothing roots it
    yet), and the new ``./result`` would dangle.
    """
    from fimio.store.fsutil import file_lock

    drv = write_drv(tmp_path / "a.toml", "a", "echo a > $out")
    realise_json(cli, drv)  # valid, rooted by nothing
    work = tmp_path / "work"
    work.mkdir()
    with file_lock(str(cli.root / "locks" / "gc.lock")):  # a collection is running
        proc = subprocess.Popen([fimio_executable(), "realise", drv], cwd=work, env=fimio_env(cli.root),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.5)
            assert proc.poll() is None, "the realise rooted its output while a GC was running"
            assert not (work / "result").exists()
        finally:
            if proc.poll() is not None:
                proc.communicate()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert os.path.realpath(work / "result") == out.strip()


def test_push_keeps_its_closure_from_a_gc_that_runs_during_the_upload(cli, tmp_path, store):
    """``push`` holds the closure it sends as temp roots: a collection that runs while the
    upload is under way deletes none of it, and the push completes."""
    from cachefixtures import make_keys
    from fimio.store.cache.push import Pusher
    from fimio.store.cache.url import open_backend

    (tmp_path / "dep").write_text("a dependency\n")
    dep = store.add_path(str(tmp_path / "dep"))
    top = store.add_text("top", dep.path.logical(STORE_DIR).encode(), references=[dep.path])
    collections = []

    class CollectingBackend:  # a gc runs just as the push asks the cache what it lacks
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def missing(self, keys):
            collections.append(gc(cli))
            return self.inner.missing(keys)

    sk, _ = make_keys()
    with keeping_temp_roots(store):  # as the push command does
        stats = Pusher(store, CollectingBackend(open_backend(f"file://{tmp_path / 'cache'}")), [sk]).push([top.path])
    assert collections and collections[0]["deleted"] == []
    assert stats.paths_sent == 2
    assert valid(cli, top.path.logical(STORE_DIR)) and valid(cli, dep.path.logical(STORE_DIR))
    assert set(gc(cli)["deleted"]) == {top.path.logical(STORE_DIR), dep.path.logical(STORE_DIR)}


def test_hold_refuses_a_path_a_gc_deleted_since_it_was_looked_up(cli, tmp_path, store):
    from fimio.store.errors import NotFound

    (tmp_path / "x").write_text("x\n")
    x = store.add_path(str(tmp_path / "x"))
    assert gc(cli)["deleted"] == [x.path.logical(STORE_DIR)]
    with keeping_temp_roots(store), pytest.raises(NotFound, match="deleted by a concurrent gc"):
        store.hold([x.path])


def test_a_second_temp_roots_file_in_one_process_fails_at_once(store):
    """Two TempRoots of one process on one store would deadlock on their own lock."""
    from fimio.store.roots import TempRoots

    first = TempRoots(store)
    try:
        with pytest.raises(RuntimeError, match="already keeps temp roots"):
            TempRoots(store)
    finally:
        first.close()
    TempRoots(store).close()  # once closed, a new one is fine


def test_roots_hold_however_the_store_root_is_spelled(tmp_path):
    """An out-link made through a symlink to the store root (or with an older spelling of
    it) roots its path for commands that name the root directly, and listing roots
    removes none of them."""
    from conftest import Fimio

    real = tmp_path / "S"
    real.mkdir()
    os.symlink(real, tmp_path / "Slink")
    via_link, direct = Fimio(tmp_path / "Slink"), Fimio(real)
    (tmp_path / "a").write_text("a\n")
    (tmp_path / "b").write_text("b\n")
    s = write_drv(tmp_path / "s.toml", "single", "echo s > $out")
    work = tmp_path / "work"
    work.mkdir()
    built = via_link.out("realise", s, cwd=work)
    assert built.startswith(str(real / "store") + "/")  # printed under the one canonical spelling
    # an out-link written with the other spelling, as an older fimio did, registered as a root
    a = direct.out("add", tmp_path / "a")
    os.symlink(str(tmp_path / "Slink" / "store" / os.path.basename(a)), work / "old-link")
    os.symlink(work / "old-link", real / "gcroots" / "by-hand")
    b = direct.out("add", tmp_path / "b")  # no root: collectable
    registered = sorted(os.listdir(real / "gcroots"))
    listed = direct.out("roots").splitlines()
    assert f"{work / 'result'} -> {built}" in listed and f"{work / 'old-link'} -> {a}" in listed
    assert sorted(os.listdir(real / "gcroots")) == registered  # listing removed nothing
    deleted = [d["physical"] for d in json.loads(direct.out("gc", "--json"))["deleted"]]
    assert b in deleted and built not in deleted and a not in deleted
    assert (work / "result").read_text() == "s\n" and (work / "old-link").read_text() == "a\n"


def test_instantiate_add_root_keeps_the_derivations(cli, tmp_path):
    """--add-root makes a symlink to each .drv (PATH, PATH-2, ...) that gc respects; without
    it an instantiated .drv is garbage."""
    src = tmp_path / "src.txt"
    src.write_text("source\n")
    a = write_drv(tmp_path / "a.toml", "a", "cat $src > $out", inputs={"src": {"path": "src.txt"}})
    b = write_drv(tmp_path / "b.toml", "b", "echo b > $out")
    link = tmp_path / "drv"
    drvs = [json.loads(cli.out("instantiate", "--json", "--add-root", link, f))[0]["drvPath"] for f in (a, b)]
    assert os.readlink(link) == str(cli.physical_store / os.path.basename(drvs[1]))  # the last call's
    both = json.loads(cli.out("instantiate", "--json", "--add-root", link, a, b))
    assert [d["drvPath"] for d in both] == drvs
    assert os.readlink(link) == both[0]["physical"] and os.readlink(f"{link}-2") == both[1]["physical"]
    assert [d["root"] for d in both] == [str(link), f"{link}-2"]
    gc(cli)
    assert all(valid(cli, d) for d in drvs)  # rooted, with the source a's .drv refers to
    os.unlink(f"{link}-2")
    deleted = gc(cli)["deleted"]
    assert drvs[1] in deleted and valid(cli, drvs[0])
    assert cli("instantiate", "--add-root", tmp_path / "no" / "such" / "dir" / "x", a).returncode == 2


def test_a_gc_while_realise_makes_its_out_link_keeps_the_output(cli, tmp_path, monkeypatch):
    """realise holds its outputs as temp roots until ./result is registered: a gc (a real
    one, in another process) run at that very moment keeps the output."""
    import gc as collector

    import fimio.cli
    from fimio.store import roots

    f = write_drv(tmp_path / "d.toml", "d", "echo d > $out")
    make_roots = roots.add_roots

    def gc_first(store, links, flag="-o"):
        cli.out("gc")
        return make_roots(store, links, flag)

    monkeypatch.setattr(roots, "add_roots", gc_first)
    monkeypatch.setenv("FIMIO_ROOT", str(cli.root))
    monkeypatch.setenv("FIMIO_CONFIG", os.devnull)
    try:
        assert fimio.cli.run(["realise", str(f), "-o", str(tmp_path / "result")]) == 0
    finally:
        collector.enable()  # run() turns the collector off, as for a one-shot command
    assert (tmp_path / "result").exists(), "gc deleted the output before ./result rooted it"


def test_an_out_link_is_made_after_its_registration_under_the_gc_lock(cli, tmp_path, monkeypatch):
    """When the link appears, its registration is already there (a kill in between leaves a
    registration gc prunes, never a link that roots nothing), and the GC lock is held: a gc
    prunes registrations whose link is missing, as it is until the link is made."""
    import gc as collector

    import fimio.cli
    from fimio.store import fsutil

    f = write_drv(tmp_path / "d.toml", "d", "echo d > $out")
    result = tmp_path / "result"
    sibling_tmp, seen = fsutil.sibling_tmp, []

    def look(path, sweep=False):
        if os.fspath(path) == str(result):
            gcroots = cli.root / "gcroots"
            registered = any(os.readlink(gcroots / n) == str(result) for n in os.listdir(gcroots))
            gc_could_run = subprocess.run(["flock", "-n", "-x", cli.root / "locks" / "gc.lock", "true"]).returncode == 0
            seen.append((registered, gc_could_run))
        return sibling_tmp(path, sweep)

    monkeypatch.setattr(fsutil, "sibling_tmp", look)
    monkeypatch.setenv("FIMIO_ROOT", str(cli.root))
    monkeypatch.setenv("FIMIO_CONFIG", os.devnull)
    cli.out("realise", "--no-out-link", f)
    for no_fast_path in ("", "1"):  # the no-op fast path (which closes its database), then the full path
        monkeypatch.setenv("FIMIO_NO_FAST_PATH", no_fast_path)
        if os.path.lexists(result):
            os.unlink(result)
        for name in os.listdir(cli.root / "gcroots"):
            os.unlink(cli.root / "gcroots" / name)
        try:
            assert fimio.cli.run(["realise", str(f), "-o", str(result)]) == 0
        finally:
            collector.enable()  # run() turns the collector off, as for a one-shot command
    assert seen == [(True, False), (True, False)]


def test_a_gc_while_copy_relies_on_a_path_here_keeps_that_path(cli, tmp_path, monkeypatch):
    """A substitution does not fetch a reference that is valid here: that reference is a temp
    root from before its validity is judged, so a gc at that moment (a real one, in another
    process) keeps it, and no valid path ever refers to a deleted one."""
    import gc as collector

    import fimio.cli
    from cachefixtures import make_keys, write_config
    from conftest import run_fimio
    from fimio.store.local import LocalStore

    sk, pk = make_keys("k-1")
    (tmp_path / "sk").write_text(str(sk) + "\n")
    (tmp_path / "dep.txt").write_text("dep\n")
    other, cache = tmp_path / "other", f"file://{tmp_path / 'cache'}"
    dep = run_fimio(["add", tmp_path / "dep.txt"], other, check=0).stdout.strip()
    top = write_drv(tmp_path / "top.toml", "top", "echo $dep > $out",
                    inputs={"dep": {"store": f"{STORE_DIR}/{os.path.basename(dep)}"}})
    top_out = run_fimio(["realise", "--no-out-link", top], other, check=0).stdout.strip()
    run_fimio(["push", cache, top_out, "--key", tmp_path / "sk"], other, check=0)
    cli.out("add", tmp_path / "dep.txt")  # valid here, and no root keeps it

    is_valid, collected = LocalStore.is_valid, []

    def gc_after_judging(store, path):  # the first time dep is judged (no lock is held then)
        valid = is_valid(store, path)
        if valid and path.base == os.path.basename(dep) and not collected:
            collected.append(cli.out("gc", timeout=60))
        return valid

    monkeypatch.setattr(LocalStore, "is_valid", gc_after_judging)
    monkeypatch.setenv("FIMIO_ROOT", str(cli.root))
    monkeypatch.setenv("FIMIO_CONFIG", write_config(tmp_path / "config.toml", trusted=[pk]))
    try:
        assert fimio.cli.run(["copy", "--from", cache, os.path.basename(top_out)]) == 0
    finally:
        collector.enable()  # run() turns the collector off, as for a one-shot command
    monkeypatch.undo()
    assert collected and cli("verify").returncode == 0
    assert os.path.exists(cli.physical_store / os.path.basename(dep))


def test_gc_removes_unregistered_store_entries(cli, tmp_path):
    """An entry of store/ without a record (a crashed writer's, a killed gc's half-deleted
    path) is garbage to gc as to verify; valid paths stay."""
    (tmp_path / "kept.txt").write_text("kept\n")
    kept = pathlib.Path(cli.out("add", tmp_path / "kept.txt"))
    junk = cli.physical_store / ("a" * 32 + "-junk")
    (junk / "sub").mkdir(parents=True)
    (junk / "sub" / "f").write_text("half written\n")
    os.symlink(kept, tmp_path / "root-link")
    os.symlink(tmp_path / "root-link", cli.root / "gcroots" / "mine")
    cli.out("gc")
    assert not junk.exists() and kept.exists()


def test_gc_roots_by_logical_name_and_never_removes_a_user_s_link(cli, tmp_path):
    """A link in gcroots/ to a path's logical name roots it, as its physical name does;
    listing roots changes nothing, and gc removes only its own registrations of out-links
    that are gone, never a link the user put there (even a dangling one)."""
    (tmp_path / "a.txt").write_text("a\n")
    a = pathlib.Path(cli.out("add", tmp_path / "a.txt"))
    gcroots = cli.root / "gcroots"
    os.symlink(f"{STORE_DIR}/{a.name}", gcroots / "by-logical-name")
    os.symlink("/nonexistent", gcroots / "dangling")
    f = write_drv(tmp_path / "d.toml", "d", "echo d > $out")
    cli.out("realise", f, "-o", tmp_path / "result")
    auto = [n for n in os.listdir(gcroots) if n.startswith("auto-")]
    os.unlink(tmp_path / "result")
    before = sorted(os.listdir(gcroots))
    assert f"{STORE_DIR}/{a.name}" in cli.out("roots", "--json") and sorted(os.listdir(gcroots)) == before
    cli.out("gc")
    assert a.exists(), "a root by logical name did not keep its path"
    assert sorted(os.listdir(gcroots)) == sorted(set(before) - set(auto)), "gc pruned a user's link, or kept a stale one"


def test_an_out_link_inside_the_logical_store_directory_s_tree_is_still_a_root(tmp_path):
    """With the logical store directory at /X, an out-link at /X/proj/result (no store path's
    name) is an out-link, not a direct root by logical name: gc keeps its output."""
    from conftest import Fimio

    logical = tmp_path / "Lg"
    (logical / "proj").mkdir(parents=True)
    cli = Fimio(tmp_path / "root")
    env = {"FIMIO_STORE_DIR": str(logical)}
    f = write_drv(tmp_path / "d.toml", "d", "echo d > $out")
    cli.out("realise", f, "-o", logical / "proj" / "result", env=env)
    cli.out("gc", env=env)
    assert (logical / "proj" / "result").read_text() == "d\n", "gc deleted a rooted output"


def test_the_deletion_order_of_a_chain_deeper_than_the_recursion_limit():
    """gc deletes referrers first; a dead chain of any length is ordered without recursion."""
    from types import SimpleNamespace

    from fimio.store.gc import _referrers_first

    n = 3 * sys.getrecursionlimit()
    ref = [SimpleNamespace(hash_part=f"h{i}") for i in range(n)]
    dead = {f"h{i}": SimpleNamespace(name=i, references=[ref[i - 1]] if i else []) for i in range(n)}
    assert [info.name for info in _referrers_first(dead)] == list(range(n - 1, -1, -1))


def test_gc_says_when_it_waits_for_a_writer(cli, tmp_path):
    (tmp_path / "f.txt").write_text("f\n")
    cli.out("add", tmp_path / "f.txt")
    holder = subprocess.Popen(["flock", "-s", cli.root / "locks" / "gc.lock", "sleep", "1.5"])
    try:
        time.sleep(0.3)  # the writer holds the lock now
        proc = cli("gc")
    finally:
        holder.wait()
    assert proc.returncode == 0 and "waiting for the GC lock" in proc.stderr, proc.stderr
    assert "waiting" not in cli("gc").stderr  # no writer: no wait, no message


def test_gc_deletes_the_lock_files_no_writer_holds(cli, tmp_path):
    from fimio.store import fsutil

    for i in range(3):
        (tmp_path / f"t{i}").write_text(f"{i}\n")
        cli.out("add", tmp_path / f"t{i}")
    locks = cli.root / "locks"
    per_path = sorted(n for n in os.listdir(locks) if n != "gc.lock")
    assert len(per_path) == 3
    with fsutil.file_lock(str(locks / per_path[0])):  # a writer at work on that path
        cli.out("gc")
        assert sorted(os.listdir(locks)) == sorted(["gc.lock", per_path[0]])
    cli.out("gc")
    assert os.listdir(locks) == ["gc.lock"]


def test_a_lock_file_deleted_while_a_writer_waits_for_it_is_opened_again(tmp_path):
    # gc deletes a lock file while holding it; a writer that opened the file before and
    # waited must not go on to hold a lock on a file that no longer has the name
    from fimio.store import fsutil

    lock = str(tmp_path / "x.lock")
    holding, release = threading.Event(), threading.Event()

    def writer():
        with fsutil.file_lock(lock):
            holding.set()
            release.wait(10)

    with fsutil.file_lock(lock):  # as remove_lock_file holds it
        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.3)  # the writer has opened the file and waits for its lock
        os.unlink(lock)
    assert holding.wait(10)
    with fsutil.file_lock(lock, blocking=False) as taken:
        assert not taken, "two holders of one lock"
    release.set()
    t.join()
