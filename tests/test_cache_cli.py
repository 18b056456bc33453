"""The cache commands through the real console script: key, push, copy, challenge, and
substitution by ``fimio realise`` from a cache another machine filled."""

from __future__ import annotations

import json
import os
import pathlib
import urllib.error
import urllib.request

import pytest

from cachefixtures import WRITE_TOKEN, Serve, make_keys, write_config
from conftest import assert_one_error_line, run_fimio, run_on_terminal
from fimio.cli.render import human_size

STORE_DIR = "/fimio/store"
SH = 'builder = "/bin/sh"\n[env]\nPATH = "/usr/bin:/bin"\n'


def graph(root: pathlib.Path) -> pathlib.Path:
    """app -> lib -> src/: two derivations and a source."""
    (root / "src").mkdir(parents=True)
    (root / "src" / "hello.txt").write_text("hello\n")
    (root / "lib.toml").write_text('name = "lib"\nargs = ["-c", "mkdir $out; cat $src/hello.txt > $out/lib.txt; '
                                   'head -c 300000 /dev/zero > $out/zeros"]\n' + SH + '[inputs]\nsrc = { path = "src" }\n')
    (root / "app.toml").write_text('name = "app"\nargs = ["-c", "cat $lib/lib.txt > $out; echo $lib >> $out"]\n'
                                   + SH + '[inputs]\nlib = { drv = "lib.toml" }\n')
    return root / "app.toml"


@pytest.fixture
def world(tmp_path):
    sk, pk = make_keys("team-1")
    (tmp_path / "sk").write_text(str(sk) + "\n")
    return {"tmp": tmp_path, "sk": str(tmp_path / "sk"), "pk": pk,
            "cfg": write_config(tmp_path / "config.toml", trusted=[pk])}


def fim(world, root, *args, env=None, **kw):
    e = {"FIMIO_CONFIG": world["cfg"], **(env or {})}
    return run_fimio(list(args), world["tmp"] / root, env=e, **kw)


def test_key_generate_and_public(world):
    secret = fim(world, "R", "key", "generate", "cache.example.org-1", check=0).stdout.strip()
    name, _, b64 = secret.partition(":")
    assert name == "cache.example.org-1" and len(b64) == 88
    public = fim(world, "R", "key", "public", input=secret + "\n", check=0).stdout.strip()
    assert public.startswith("cache.example.org-1:") and len(public.partition(":")[2]) == 44
    assert_one_error_line(fim(world, "R", "key", "public", input=""), 2, "no secret key")
    assert_one_error_line(fim(world, "R", "key", "public", input="x:AAAA"), 2, "invalid secret key")
    assert_one_error_line(fim(world, "R", "key", "generate", "bad:name"), 2, "invalid key name")


def test_push_and_copy_show_progress_on_a_terminal_only(world, tmp_path):
    src = tmp_path / "tree"
    src.mkdir()
    for i in range(20):
        (src / f"f{i}").write_bytes(os.urandom(100_000))
    path = fim(world, "A", "add", src, check=0).stdout.strip()
    cache = f"file://{tmp_path / 'cache'}"
    code, _, shown = run_on_terminal(["push", cache, path, "--key", world["sk"]], tmp_path / "A",
                                     env={"FIMIO_CONFIG": world["cfg"]})
    assert code == 0
    bar = shown.split("\r\x1b[K")[1]  # the first drawing
    assert bar.startswith("pushing to file://") and "% " in bar and len(bar) < 80  # fits the terminal
    assert shown.rindex("\r\x1b[K") > shown.rindex("% ")  # erased before the result line
    assert "\r" not in fim(world, "A", "push", f"{cache}2", path, "--key", world["sk"], check=0).stderr

    logical = f"{STORE_DIR}/{os.path.basename(path)}"
    code, out, shown = run_on_terminal(["copy", "--from", cache, logical], tmp_path / "B",
                                       env={"FIMIO_CONFIG": world["cfg"]})
    assert code == 0 and out.strip() == str(tmp_path / "B" / "store" / os.path.basename(path))
    bar = shown.split("\r\x1b[K")[1]
    assert bar.startswith("copying from file://") and bar.endswith("/ 1.9 MiB") and len(bar) < 80
    assert shown.rindex("\r\x1b[K") > shown.rindex("/ 1.9 MiB")
    assert "\r" not in fim(world, "C", "copy", "--from", cache, logical, check=0).stderr


def test_push_derivation_then_realise_substitutes_it(world, tmp_path):
    app = graph(tmp_path / "g")
    cache = f"file://{tmp_path / 'cache'}"
    out = fim(world, "A", "realise", app, "--no-out-link", check=0).stdout.strip()
    pushed = json.loads(fim(world, "A", "push", cache, app, "--key", world["sk"], "--json", check=0).stdout)
    assert pushed["realisationsSent"] == 1 and pushed["pathsSent"] >= 2
    # machine B: same logical store, other root; builds nothing, fetches everything
    res = json.loads(fim(world, "B", "realise", app, "--no-out-link", "--substituter", cache, "--json",
                         check=0).stdout)
    assert res["built"] == [] and res["substituted"]
    b_out = fim(world, "B", "realise", app, "--no-out-link", check=0).stdout.strip()
    assert open(b_out).read() == open(out).read()
    assert fim(world, "B", "verify", "--check-contents").returncode == 0
    # machine C, at a terminal: a substitution progress line, erased before the summary
    code, c_out, shown = run_on_terminal(["realise", app, "--no-out-link", "--substituter", cache], tmp_path / "C",
                                         env={"FIMIO_CONFIG": world["cfg"]})
    assert code == 0 and open(c_out.strip()).read() == open(out).read()
    assert "\r\x1b[Ksubstituting [" in shown and "built 0, substituted" in shown
    assert shown.rindex("\r\x1b[K") > shown.rindex("substituting [")
    # a second push finds everything there
    again = json.loads(fim(world, "A", "push", cache, app, "--key", world["sk"], "--json", check=0).stdout)
    assert again["pathsSent"] == 0 and again["bytesSent"] == 0


def test_push_of_unbuilt_derivation_is_not_found(world, tmp_path):
    app = graph(tmp_path / "g")
    assert_one_error_line(fim(world, "A", "push", f"file://{tmp_path / 'c'}", app), 5, "realise")


def test_copy_counts_the_paths_it_fetched(world, tmp_path):
    app = graph(tmp_path / "g")
    out = fim(world, "A", "realise", app, "--no-out-link", check=0).stdout.strip()
    cache = f"file://{tmp_path / 'c'}"
    fim(world, "A", "push", cache, out, "--key", world["sk"], check=0)
    closure = fim(world, "A", "query", "--requisites", out, check=0).stdout.split()
    first = fim(world, "B", "copy", "-j", "2", "--from", cache, out, check=0).stderr
    assert f"copied {len(closure)} path(s)" in first, first
    assert "copied 0 path(s)" in fim(world, "B", "copy", "--from", cache, out, check=0).stderr


def test_copy_counts_only_what_it_registered_itself(world, tmp_path, monkeypatch):
    """Two copies of one path at once: the one that finds it made valid meanwhile by the
    other (a real second process, run between its download and its registration) says it
    copied nothing."""
    from fimio.store.cache import substitute
    from fimio.store.cache.substitute import SubstituterSet
    from fimio.store.config import load_config
    from fimio.store.local import LocalStore
    from fimio.store.paths import StorePath

    app = graph(tmp_path / "g")
    out = fim(world, "A", "realise", app, "--no-out-link", check=0).stdout.strip()
    cache = f"file://{tmp_path / 'c'}"
    fim(world, "A", "push", cache, out, "--key", world["sk"], check=0)
    closure = fim(world, "A", "query", "--requisites", out, check=0).stdout.split()
    fetch = substitute.fetch_paths

    def fetch_while_another_copies(*args):
        items = fetch(*args)
        assert f"copied {len(closure)} path(s)" in fim(world, "B", "copy", "--from", cache, out, check=0).stderr
        return items

    monkeypatch.setattr(substitute, "fetch_paths", fetch_while_another_copies)
    store = LocalStore.open(str(tmp_path / "B"), STORE_DIR)
    config = load_config(world["cfg"])
    with SubstituterSet(store, [cache], config.trusted_public_keys, config=config) as subs:
        path = StorePath.parse(os.path.basename(out))
        assert subs.substitute([path]) == {path} and store.is_valid(path)
        assert subs.stats.objects > 0 and subs.stats.paths == 0
    store.close()


def test_copy_to_from_and_between_caches(world, tmp_path):
    (tmp_path / "f.txt").write_text("payload\n")
    path = fim(world, "A", "add", tmp_path / "f.txt", check=0).stdout.strip()
    logical = f"{STORE_DIR}/{os.path.basename(path)}"
    c1, c2 = f"file://{tmp_path / 'c1'}", f"file://{tmp_path / 'c2'}"
    assert fim(world, "A", "copy", "--to", c1, "--key", world["sk"], path).returncode == 0
    assert fim(world, "B", "copy", "--from", c1, "--to", c2, "--key", world["sk"], logical).returncode == 0
    got = fim(world, "C", "copy", "--from", c2, os.path.basename(path).split("-")[0], check=0).stdout.strip()
    assert open(got).read() == "payload\n"
    assert_one_error_line(fim(world, "C", "copy", logical), 2, "--from")
    assert_one_error_line(fim(world, "C", "copy", "--from", c2, f"{STORE_DIR}/{'0' * 32}-nothing"), 5)


def test_unsigned_push_warns(world, tmp_path):
    (tmp_path / "f.txt").write_text("x\n")
    path = fim(world, "A", "add", tmp_path / "f.txt", check=0).stdout.strip()
    proc = fim(world, "A", "push", f"file://{tmp_path / 'c'}", path, check=0)
    assert "unsigned" in proc.stderr


def test_a_refused_cache_is_warned_about_once(world, tmp_path):
    """A cache whose record of a dependency no trusted key signed: realise builds instead
    and says so once, however often planning meets the refusal."""
    app = graph(tmp_path / "g")
    cache = tmp_path / "c"
    out = fim(world, "A", "realise", app, "--no-out-link", check=0).stdout.strip()
    fim(world, "A", "push", f"file://{cache}", app, "--key", world["sk"], check=0)
    for info in (cache / "info").iterdir():  # every record but the target's loses its signature
        if not os.path.basename(out).startswith(info.name[:32]):
            record = json.loads(info.read_text())
            record["signatures"] = []
            info.write_text(json.dumps(record))
    proc = fim(world, "B", "realise", app, "--no-out-link", "--substituter", f"file://{cache}", check=0)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("fimio: warning:")]
    assert warnings and len(warnings) == len(set(warnings)), proc.stderr


@pytest.mark.parametrize("url,code,needle", [
    ("nope://x", 2, "unknown scheme"),
    ("file:relative", 2, "absolute path"),
    ("http://127.0.0.1:9", 6, "cannot reach"),
])
def test_bad_and_unreachable_caches(world, tmp_path, url, code, needle):
    (tmp_path / "f.txt").write_text("x\n")
    path = fim(world, "A", "add", tmp_path / "f.txt", check=0).stdout.strip()
    assert_one_error_line(fim(world, "A", "push", url, path, "--key", world["sk"]), code, needle)
    assert_one_error_line(fim(world, "B", "copy", "--from", url, path), code, needle)


def test_store_dir_mismatch_is_refused(world, tmp_path):
    (tmp_path / "f.txt").write_text("x\n")
    path = fim(world, "A", "add", tmp_path / "f.txt", check=0).stdout.strip()
    cache = f"file://{tmp_path / 'c'}"
    fim(world, "A", "push", cache, path, "--key", world["sk"], check=0)
    proc = fim(world, "O", "copy", "--from", cache, path, env={"FIMIO_STORE_DIR": "/other/store"})
    assert_one_error_line(proc, 2, "store directory")


def test_challenge_agreement_and_disagreement(world, tmp_path):
    from fimio.store.cache.keys import SecretKey
    from fimio.store.cache.layout import Realisation

    app = graph(tmp_path / "g")
    good, bad = tmp_path / "good", tmp_path / "bad"
    fim(world, "A", "realise", app, "--no-out-link", check=0)
    fim(world, "A", "push", f"file://{good}", app, "--key", world["sk"], check=0)
    fim(world, "A", "push", f"file://{bad}", app, "--key", world["sk"], check=0)
    text = fim(world, "A", "challenge", app, "--cache", f"file://{good}", check=0).stdout
    assert ": agree" in text
    # another builder (trusted) claims a different root for the same output
    (rfile,) = list((bad / "realisations").iterdir())
    drv_hash, _, output = rfile.name[:-5].partition("!")
    r = Realisation.parse(rfile.read_bytes(), STORE_DIR, drv_hash, output, "x")
    r.root = bytes(32)
    key = SecretKey.parse(open(world["sk"]).read())
    r.signatures = [key.sign(r.fingerprint(STORE_DIR))]
    rfile.write_bytes(r.to_json(STORE_DIR))
    proc = fim(world, "B", "challenge", app, "--cache", f"file://{good}", "--cache", f"file://{bad}", "--json")
    assert proc.returncode == 3
    data = json.loads(proc.stdout)
    assert data[0]["agree"] is False
    assert {c["source"] for c in data[0]["claims"] if c["digest"]} == {f"file://{good}", f"file://{bad}"}
    # an untrusted claim is shown but decides nothing
    write_config(world["cfg"], trusted=[make_keys("other")[1]])
    proc = fim(world, "A", "challenge", app, "--cache", f"file://{bad}")
    assert proc.returncode == 0 and "untrusted" in proc.stdout


def test_serve_sigterm_exits_cleanly_and_push_through_it(world, tmp_path):
    (tmp_path / "f.txt").write_text("served\n")
    path = fim(world, "A", "add", tmp_path / "f.txt", check=0).stdout.strip()
    srv = Serve(f"file://{tmp_path / 'cache'}", tmp_path, tokens={WRITE_TOKEN: "write"}, anonymous_read=True)
    try:
        fim(world, "A", "push", srv.url, path, "--key", world["sk"], env={"FIMIO_TOKEN": WRITE_TOKEN}, check=0)
        got = fim(world, "B", "copy", "--from", srv.url, path, check=0).stdout.strip()
        assert open(got).read() == "served\n"
    finally:
        assert srv.stop() == 0


def test_targets_are_taken_as_every_command_takes_them(world, tmp_path):
    """./result (a symlink into the store) works for push, challenge and copy; a missing
    derivation file is not found (exit 5) and a directory is bad input (exit 2), in every
    command that takes a derivation."""
    app = graph(tmp_path / "g")
    work = tmp_path / "work"
    work.mkdir()
    fim(world, "A", "realise", app, cwd=work, check=0)
    cache = f"file://{tmp_path / 'c'}"
    fim(world, "A", "push", cache, "./result", "--key", world["sk"], cwd=work, check=0)
    assert ": agree" in fim(world, "A", "challenge", "./result", "--cache", cache, cwd=work, check=0).stdout
    got = fim(world, "B", "copy", "--from", cache, "./result", cwd=work, check=0).stdout.strip()
    assert os.path.basename(got) == os.path.basename(os.readlink(work / "result"))
    for args in (["push", cache], ["challenge", "--cache", cache], ["realise"], ["export", "-o", "x.bundle", "--key", world["sk"]]):
        assert_one_error_line(fim(world, "A", *args, tmp_path / "nope.toml", cwd=work), 5, "nope.toml")
        assert_one_error_line(fim(world, "A", *args, tmp_path / "g", cwd=work), 2, str(tmp_path / "g"))


def test_a_cache_that_fails_while_downloading_means_building_instead(world, tmp_path):
    """The cache has the outputs, but every content object answers HTTP 500: realise warns
    and builds them (as if the cache had had nothing); the result is the same."""
    import functools
    import http.server
    import threading

    app = graph(tmp_path / "g")
    cache_dir = tmp_path / "cache"
    out = fim(world, "A", "realise", app, "--no-out-link", check=0).stdout.strip()
    fim(world, "A", "push", f"file://{cache_dir}", app, "--key", world["sk"], check=0)

    class Failing(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith(("/packs/", "/chunks/")):
                self.send_error(500)
            else:
                super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Failing, directory=str(cache_dir)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        proc = fim(world, "B", "realise", app, "--no-out-link", "--json", "--substituter",
                   f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert proc.returncode == 0, proc.stderr
    assert "not using 'http://127.0.0.1:" in proc.stderr and json.loads(proc.stdout)["built"]
    assert fim(world, "B", "realise", app, "--no-out-link", check=0).stdout.strip() == out.replace(
        str(tmp_path / "A"), str(tmp_path / "B"))


def test_a_derivation_given_through_a_symlink_is_a_derivation(world, tmp_path):
    """push of a .drv reached through a symlink pushes its outputs and realisation, as push
    of the .drv itself does (not the .drv file as a plain path)."""
    app = graph(tmp_path / "g")
    fim(world, "A", "realise", app, "--no-out-link", check=0)
    drv = fim(world, "A", "instantiate", app, check=0).stdout.strip()
    os.symlink(drv, tmp_path / "drvlink")
    pushed = json.loads(fim(world, "A", "push", f"file://{tmp_path / 'c'}", tmp_path / "drvlink", "--key",
                            world["sk"], "--json", check=0).stdout)
    assert pushed["realisationsSent"] == 1


def test_challenge_asks_the_caches_for_a_bare_hash_and_never_takes_a_dead_cache_for_absent(world, tmp_path):
    (tmp_path / "f.txt").write_text("challenged\n")
    path = fim(world, "A", "add", tmp_path / "f.txt", check=0).stdout.strip()
    hash_part = path.rsplit("/", 1)[1][:32]
    cache = f"file://{tmp_path / 'c'}"
    fim(world, "A", "push", cache, path, "--key", world["sk"], check=0)
    # a store that does not hold the path finds it in the cache by its hash part
    text = fim(world, "B", "challenge", hash_part, "--cache", cache, check=0).stdout
    assert text.startswith(f"{tmp_path / 'B' / 'store'}/{path.rsplit('/', 1)[1]}: ") and "blake3:" in text
    assert_one_error_line(fim(world, "A", "challenge", path, "--cache", "http://127.0.0.1:9"), 6, "cannot reach")
    # a file:// cache whose directory is not there (an unmounted share) is down too, not "absent"
    gone = f"file://{tmp_path / 'not-mounted'}"
    assert_one_error_line(fim(world, "A", "challenge", path, "--cache", gone), 6, "does not exist")
    other = tmp_path / "other"
    elsewhere = fim(world, "O", "add", tmp_path / "f.txt", env={"FIMIO_STORE_DIR": "/other/store"}, check=0)
    fim(world, "O", "push", f"file://{other}", elsewhere.stdout.strip(), env={"FIMIO_STORE_DIR": "/other/store"},
        check=0)
    assert_one_error_line(fim(world, "A", "challenge", path, "--cache", f"file://{other}"), 2, "store directory")


def test_garbage_in_place_of_cache_entries_is_the_cache_s_fault(world, tmp_path):
    """A directory where an object or info file should be: readers refuse it (exit 4; realise
    builds instead), pushers name the cache (exit 6), fimio serve answers 404."""
    import shutil

    app = graph(tmp_path / "g")
    good = tmp_path / "good"
    out = fim(world, "A", "realise", app, "--no-out-link", check=0).stdout.strip()
    fim(world, "A", "push", f"file://{good}", app, "--key", world["sk"], check=0)
    for kind in ("info", "packs"):
        broken = tmp_path / f"broken-{kind}"
        shutil.copytree(good, broken)
        victim = sorted((broken / kind).rglob("*.*"))[0]
        victim.unlink()
        victim.mkdir()
        proc = fim(world, f"B-{kind}", "copy", "--from", f"file://{broken}", out)
        assert_one_error_line(proc, 4, "directory")
        proc = fim(world, f"C-{kind}", "realise", app, "--no-out-link", "--substituter", f"file://{broken}")
        assert proc.returncode == 0 and "building instead" in proc.stderr, proc.stderr
        if kind == "packs":
            srv = Serve(f"file://{broken}", tmp_path)
            try:
                key = victim.relative_to(broken).as_posix()
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(f"{srv.url}/{key}", timeout=10)
                assert e.value.code == 404
            finally:
                srv.stop()
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "info").write_text("not a directory\n")
    proc = fim(world, "A", "push", f"file://{blocked}", app, "--key", world["sk"])
    assert_one_error_line(proc, 6, "cache")
    assert "store root" not in proc.stderr


@pytest.mark.parametrize("kind", ["file", "serve"])
def test_push_counts_only_what_it_published(world, tmp_path, kind):
    """Two machines pushing the same path at once: the one whose info lands second has
    published nothing, and says so (the race is forced by answering "all missing"). Through
    fimio serve too, which answers 200 for an object it had and 201 for a new one: that is
    what tells a later push of a non-reproducible output that it is in conflict."""
    from fimio.store.cache.push import Pusher
    from fimio.store.cache.url import open_backend
    from fimio.store.local import LocalStore

    (tmp_path / "f.txt").write_text("raced\n")
    srv = Serve(f"file://{tmp_path / 'c'}", tmp_path, tokens={WRITE_TOKEN: "write"}) if kind == "serve" else None
    cache = srv.url if srv else f"file://{tmp_path / 'c'}"
    token = WRITE_TOKEN if srv else None
    stores = [LocalStore(str(tmp_path / r), STORE_DIR) for r in ("A", "B")]
    try:
        paths = [s.add_path(str(tmp_path / "f.txt")).path for s in stores]
        first = Pusher(stores[0], open_backend(cache, token=token), []).push([paths[0]])
        assert first.paths_sent == 1
        late = open_backend(cache, token=token)
        late.missing = lambda keys: set(keys)  # it asked before the first push landed
        second = Pusher(stores[1], late, []).push([paths[1]])
        assert second.paths_sent == 0 and second.sent_paths == []
        if kind == "file":  # (fimio serve's object PUTs are not told apart: see HttpBackend.put)
            assert second.objects_sent == 0
    finally:
        for s in stores:
            s.close()
        if srv:
            srv.stop()


def test_a_realisation_that_contradicts_the_cache_is_not_pushed(world, tmp_path):
    """A and B build a derivation that is not reproducible; A pushes first. B's realisation
    would name A's path with B's contents: B is warned and pushes none, so readers keep
    substituting A's build instead of rebuilding every time."""
    drv = tmp_path / "rand.toml"
    drv.write_text('name = "rand"\nargs = ["-c", "head -c 16 /dev/urandom > $out"]\n' + SH)
    cache = f"file://{tmp_path / 'c'}"
    out_a = fim(world, "A", "realise", drv, "--no-out-link", check=0).stdout.strip()
    fim(world, "B", "realise", drv, "--no-out-link", check=0)
    fim(world, "A", "push", cache, drv, "--key", world["sk"], check=0)
    proc = fim(world, "B", "push", cache, drv, "--key", world["sk"], "--json", check=0)
    report = json.loads(proc.stdout)
    assert report["realisationsSent"] == 0 and report["conflicts"] == [f"{STORE_DIR}/{os.path.basename(out_a)}"]
    assert "the cache holds other contents for" in proc.stderr
    proc = fim(world, "C", "realise", drv, "--no-out-link", "--json", "--substituter", cache, check=0)
    assert json.loads(proc.stdout)["built"] == [] and "disagrees" not in proc.stderr, proc.stderr
    out_c = fim(world, "C", "realise", drv, "--no-out-link", check=0).stdout.strip()
    assert pathlib.Path(out_c).read_bytes() == pathlib.Path(out_a).read_bytes()


def test_ctrl_c_while_realise_downloads_from_a_stalled_cache(world, tmp_path):
    from conftest import fimio_env
    from test_cache_tamper import _StallingServer

    app = tmp_path / "big.toml"  # an output of incompressible megabytes: its object is large enough to stall
    app.write_text('name = "big"\nargs = ["-c", "head -c 3000000 /dev/urandom > $out"]\n' + SH)
    fim(world, "A", "realise", app, "--no-out-link", check=0)
    fim(world, "A", "push", f"file://{tmp_path / 'c'}", app, "--key", world["sk"], check=0)
    server = _StallingServer(tmp_path / "c")
    try:
        server.assert_ctrl_c_ends(["realise", "--no-out-link", "--substituter", server.url, app],
                                  fimio_env(tmp_path / "B", {"FIMIO_CONFIG": world["cfg"]}))
    finally:
        server.stop()


def test_a_substitution_reports_the_closure_it_fetched_as_its_dry_run_does(world, tmp_path):
    app = graph(tmp_path / "g")  # app's output refers to lib's: fetching app fetches lib
    cache = f"file://{tmp_path / 'cache'}"
    fim(world, "A", "realise", app, "--no-out-link", check=0)
    fim(world, "A", "push", cache, app, "--key", world["sk"], check=0)
    plan = json.loads(fim(world, "B", "realise", "-n", "--json", app, "--substituter", cache, check=0).stdout)
    fetched = sorted(f["path"] for f in plan["fetch"])
    assert len(fetched) == 2 and plan["build"] == []
    done = fim(world, "B", "realise", "--json", "--no-out-link", app, "--substituter", cache, check=0)
    assert sorted(json.loads(done.stdout)["substituted"]) == fetched
    text = fim(world, "C", "realise", "--no-out-link", app, "--substituter", cache, check=0)
    assert "built 0, substituted 2" in text.stderr


def test_dry_run_names_what_would_be_built_and_fetched_and_does_neither(world, tmp_path):
    app = graph(tmp_path / "g")
    lib = tmp_path / "g" / "lib.toml"
    cache = f"file://{tmp_path / 'cache'}"
    lib_out = f"{STORE_DIR}/{os.path.basename(fim(world, 'A', 'realise', lib, '--no-out-link', check=0).stdout.strip())}"
    fim(world, "A", "push", cache, lib, "--key", world["sk"], check=0)

    plan = json.loads(fim(world, "B", "realise", "--dry-run", "--json", app, "--substituter", cache, check=0).stdout)
    (target,) = plan["targets"]
    assert plan["build"] == [{"path": target["drvPath"], "physical": target["physical"]}]
    assert [(f["path"], f["physical"], f["cache"]) for f in plan["fetch"]] == \
        [(lib_out, f"{tmp_path / 'B' / 'store'}/{os.path.basename(lib_out)}", cache)]
    assert plan["fetch"][0]["size"] > 300000
    assert fim(world, "B", "path-info", lib_out).returncode == 5, "a dry run fetched"
    assert fim(world, "B", "path-info", target["outputs"]["out"]["path"]).returncode == 5, "a dry run built"
    assert not (tmp_path / "result").exists()
    text = fim(world, "B", "realise", "-n", app, "--substituter", cache, check=0).stdout
    assert f"1 derivation(s) would be built:\n  {target['physical']}\n" in text
    size = human_size(plan["fetch"][0]["size"])
    assert f"1 path(s) would be fetched (" in text and f"  {plan['fetch'][0]['physical']}  {size}  from {cache}\n" in text
    # the real realise does what the dry run said
    done = json.loads(fim(world, "B", "realise", "--json", "--no-out-link", app, "--substituter", cache,
                          check=0).stdout)
    assert done["built"] == [b["path"] for b in plan["build"]] and done["substituted"] == [lib_out]
    assert fim(world, "B", "realise", "-n", app, check=0).stdout == "nothing to do: every output is valid\n"
    assert_one_error_line(fim(world, "B", "realise", "-n", "--check", app), 2, "--dry-run and --check")


def test_dry_run_and_realise_agree_on_a_realisation_that_disagrees_with_its_path(world, tmp_path):
    """A realisation naming the right path with other contents (a build that is not
    reproducible, published by another machine) is refused by a substitution, which then
    builds; a dry run says the same: build, fetch nothing."""
    import shutil

    drv = tmp_path / "rand.toml"
    drv.write_text('name = "rand"\nargs = ["-c", "head -c 16 /dev/urandom > $out"]\n' + SH)
    cache_a, cache_b = tmp_path / "ca", tmp_path / "cb"
    fim(world, "A", "realise", drv, "--no-out-link", check=0)
    fim(world, "B", "realise", drv, "--no-out-link", check=0)
    fim(world, "A", "push", f"file://{cache_a}", drv, "--key", world["sk"], check=0)
    fim(world, "B", "push", f"file://{cache_b}", drv, "--key", world["sk"], check=0)
    (record,) = (cache_b / "realisations").iterdir()
    shutil.copyfile(record, cache_a / "realisations" / record.name)  # B's realisation beside A's path
    plan = fim(world, "C", "realise", "-n", "--json", drv, "--substituter", f"file://{cache_a}", check=0)
    assert json.loads(plan.stdout)["fetch"] == [] and len(json.loads(plan.stdout)["build"]) == 1
    assert "disagrees" in plan.stderr, plan.stderr
    done = fim(world, "C", "realise", "--json", "--no-out-link", drv, "--substituter", f"file://{cache_a}", check=0)
    assert json.loads(done.stdout)["substituted"] == [] and "disagrees" in done.stderr


def test_a_realise_that_lacks_something_downloads_nothing_before_saying_so(world, tmp_path):
    """A .drv target nobody holds beside a target the cache has: exit 5 naming it, and the
    cached output is not downloaded for a realise that cannot go on."""
    app = graph(tmp_path / "g")
    lib = tmp_path / "g" / "lib.toml"
    cache = f"file://{tmp_path / 'cache'}"
    lib_out = f"{STORE_DIR}/{os.path.basename(fim(world, 'A', 'realise', lib, '--no-out-link', check=0).stdout.strip())}"
    fim(world, "A", "push", cache, lib, "--key", world["sk"], check=0)
    nobody = f"{STORE_DIR}/{'1' * 32}-nobody.drv"
    proc = fim(world, "B", "realise", "--no-out-link", app, nobody, "--substituter", cache)
    assert proc.returncode == 5 and proc.stderr.splitlines() == [
        f"  {nobody}: derivation not obtainable",
        "fimio: error: 1 item(s) needed cannot be obtained here (realise or copy them first, or give a "
        "--substituter that has them)"], proc.stderr
    assert fim(world, "B", "path-info", lib_out).returncode == 5, "downloaded for a realise that failed"
    # a lack found only while planning (a fixed output never fetched, offline) is no different
    (tmp_path / "data.txt").write_text("data\n")
    (tmp_path / "g" / "fod.toml").write_text(f'name = "data.txt"\n[fetch]\nurl = "file://{tmp_path / "data.txt"}"\n'
                                             f'hash = "sha256:{"0" * 64}"\n')
    (tmp_path / "g" / "both.toml").write_text('name = "both"\nargs = ["-c", "cat $lib/lib.txt $fod > $out"]\n' + SH
                                              + '[inputs]\nlib = { drv = "lib.toml" }\nfod = { drv = "fod.toml" }\n')
    proc = fim(world, "B", "realise", "--offline", "--no-out-link", tmp_path / "g" / "both.toml", "--substituter", cache)
    assert proc.returncode == 5 and "-data.txt: fixed-output derivation" in proc.stderr, proc.stderr
    assert fim(world, "B", "path-info", lib_out).returncode == 5, "downloaded for a realise that failed"


def test_a_broken_cache_is_dropped_and_the_others_still_serve(world, tmp_path):
    """Two caches: 'good' holds lib, 'bad' holds app but lost its manifest. app's fetch
    fails; realise stops using 'bad', still substitutes lib from 'good' and builds only
    app -- also offline, where building lib's fixed-output-free graph needs no network."""
    app = graph(tmp_path / "g")
    lib = tmp_path / "g" / "lib.toml"
    good, bad = tmp_path / "good", tmp_path / "bad"
    app_out = fim(world, "A", "realise", app, "--no-out-link", check=0).stdout.strip()
    lib_out = f"{STORE_DIR}/{os.path.basename(fim(world, 'A', 'realise', lib, '--no-out-link', check=0).stdout.strip())}"
    fim(world, "A", "push", f"file://{good}", lib, "--key", world["sk"], check=0)
    fim(world, "A", "push", f"file://{bad}", app, "--key", world["sk"], check=0)
    info = json.loads((bad / "info" / f"{os.path.basename(app_out)[:32]}.json").read_text())
    manifest = info["manifest"]["digest"].split(":")[-1]
    (bad / "trees" / manifest[:2] / f"{manifest}.zst").unlink()
    for offline in ([], ["--offline"]):
        root = f"B{len(offline)}"
        proc = fim(world, root, "realise", *offline, "--json", "--no-out-link", app,
                   "--substituter", f"file://{good}", "--substituter", f"file://{bad}")
        assert proc.returncode == 0, proc.stderr
        done = json.loads(proc.stdout)
        assert done["substituted"] == [lib_out] and [os.path.basename(b) for b in done["built"]] == [
            os.path.basename(done["targets"][0]["drvPath"])], done
        assert f"not using 'file://{bad}' again" in proc.stderr, proc.stderr


def test_outputs_that_refer_to_each_other_are_fetched_across_transactions(world, monkeypatch):
    """Registration commits in batches; two outputs referring to each other (out <-> dev) may
    fall into two of them, and neither is a reference that vanished."""
    import gc as collector

    import fimio.cli
    from fimio.store.cache import ingest
    from test_sandbox import write_drv

    f = write_drv(world["tmp"] / "mo.toml", "mo", "mkdir $out $dev; echo $dev > $out/d; echo $out > $dev/o",
                  outputs=["out", "dev"])
    out = fim(world, "A", "realise", "--no-out-link", f, check=0).stdout.split()[0]
    cache = f"file://{world['tmp'] / 'cache'}"
    fim(world, "A", "push", cache, f, "--key", world["sk"], check=0)
    monkeypatch.setattr(ingest, "BATCH", 1)
    monkeypatch.setenv("FIMIO_ROOT", str(world["tmp"] / "B"))
    monkeypatch.setenv("FIMIO_CONFIG", world["cfg"])
    try:
        assert fimio.cli.run(["copy", "--from", cache, os.path.basename(out)]) == 0
    finally:
        collector.enable()  # run() turns the collector off, as for a one-shot command
    monkeypatch.undo()
    assert fim(world, "B", "verify", "--check-contents").returncode == 0
    assert len(json.loads(fim(world, "B", "path-info", "-r", "--json", os.path.basename(out)).stdout)) == 2
