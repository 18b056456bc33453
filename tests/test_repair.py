"""``fimio verify --check-contents --repair`` (``store/repair.py``): damaged paths are fetched
again from the configured substituters and accepted only with the registered root digest.

* a flipped byte in a blob shared by two paths, a deleted file, a deleted path, a truncated
  single-file path, a reference whose record is gone: repaired, verify clean afterwards;
* a cache holding another digest for the path (a non-reproducible rebuild): refused and
  named, the damaged copy left as it was, exit 4 -- never a silent new hash;
* no substituter, an unreachable one, one that lacks the path: exit 4, each problem says why;
* a repair SIGKILLed at random moments leaves the path damaged or whole (never missing nor
  mixed), and the next repair completes.
"""

from __future__ import annotations

import os
import pathlib
import random
import shutil
import signal
import subprocess
import time

import pytest

import faults
from cachefixtures import make_keys, write_config
from conftest import STORE_DIR, assert_one_error_line, fimio_env, fimio_executable, run_fimio
from fimio.store.local import LocalStore
from fimio.store.paths import StorePath

SH = 'builder = "/bin/sh"\n[env]\nPATH = "/usr/bin:/bin"\n[sandbox]\nhost_paths = ["/usr", "/bin", "/lib", "/lib64"]\n'


@pytest.fixture(scope="module")
def origin(tmp_path_factory):
    """A store with two trees sharing a file, a single file, a derivation output and its
    input; all pushed (signed) to a file:// cache."""
    work = tmp_path_factory.mktemp("repair")
    sk, pk = make_keys("repair-1")
    (work / "sk").write_text(str(sk) + "\n")
    shared = os.urandom(300_000)
    for name in ("t1", "t2"):
        d = work / name
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "shared.bin").write_bytes(shared)
        (d / "own.txt").write_text(f"only in {name}\n")
        (d / "big.bin").write_bytes(os.urandom(3_000_000))
    (work / "single.txt").write_text("a single-file store path\n" * 100)
    (work / "lib.toml").write_text('name = "lib"\nargs = ["-c", "mkdir $out; echo lib > $out/lib.txt"]\n' + SH)
    (work / "app.toml").write_text('name = "app"\nargs = ["-c", "mkdir $out; echo $lib > $out/uses; '
                                   'cat $lib/lib.txt > $out/copy"]\n' + SH + '[inputs]\nlib = { drv = "lib.toml" }\n')
    cfg0 = write_config(work / "plain.toml", trusted=[pk])
    src = work / "src"
    paths = {n: faults.fim(["add", work / n], src, cfg0, check=0).stdout.strip() for n in ("t1", "t2", "single.txt")}
    paths["app"] = faults.fim(["realise", "--no-out-link", work / "app.toml"], src, cfg0, check=0).stdout.strip()
    cache = work / "cache"
    faults.fim(["push", f"file://{cache}", *paths.values(), "--key", work / "sk"], src, cfg0, check=0)
    cfg = write_config(work / "config.toml", trusted=[pk], substituters=[f"file://{cache}"])
    return {"work": work, "src": src, "paths": {k: os.path.basename(v) for k, v in paths.items()},
            "config": cfg, "plain": cfg0, "cache": cache, "pk": pk}


@pytest.fixture
def damaged(origin, tmp_path):
    """A copy of the origin store to damage."""
    root = tmp_path / "root"
    subprocess.run(["cp", "-a", str(origin["src"]), str(root)], check=True)
    return root


def fim(origin, root, *args, config=None, **kw):
    return run_fimio(list(args), root, env={"FIMIO_CONFIG": config or origin["config"]}, **kw)


def flip(path: pathlib.Path, offset: int = 100) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_repair_of_a_shared_blob_a_deleted_file_and_a_deleted_path(origin, damaged):
    store = damaged / "store"
    p = origin["paths"]
    flip(store / p["t1"] / "sub" / "shared.bin")  # one inode: t2's copy is damaged too
    os.chmod(store / p["t2"], 0o755)
    os.unlink(store / p["t2"] / "own.txt")
    quick = faults.fim(["verify"], damaged, origin["config"], check=4).stdout  # the mode, without reading
    assert f"{p['t2']}: has mode 0755, not read-only" in quick and "own.txt" not in quick
    shutil.rmtree(store / p["single.txt"], ignore_errors=True)
    os.unlink(store / p["single.txt"])
    before = fim(origin, damaged, "verify", "--check-contents", check=4).stdout
    assert f"{p['t1']}/sub/shared.bin: contents differ" in before
    assert f"{p['t2']}/sub/shared.bin: contents differ" in before and f"{p['t2']}/own.txt: is missing" in before
    assert f"{p['single.txt']}: is registered but missing on disk" in before
    fim(origin, damaged, "verify", "--check-contents", "--repair", check=0)
    fim(origin, damaged, "verify", "--check-contents", check=0)
    assert (store / p["t1"] / "sub" / "shared.bin").read_bytes() == (origin["work"] / "t1" / "sub" / "shared.bin").read_bytes()
    assert (store / p["t2"] / "own.txt").read_text() == "only in t2\n"
    assert os.stat(store / p["t2"]).st_mode & 0o777 == 0o555  # normal form again



def test_repair_of_a_path_left_writable(origin, damaged):
    top = damaged / "store" / origin["paths"]["t1"]
    os.chmod(top, 0o755)  # as a repair killed between its move and its chmod leaves it
    assert "has mode 0755" in fim(origin, damaged, "verify", check=4).stdout
    fim(origin, damaged, "verify", "--repair", check=0)
    assert os.stat(top).st_mode & 0o777 == 0o555
    fim(origin, damaged, "verify", "--check-contents", check=0)

def test_repair_of_a_truncated_single_file_path(origin, damaged):
    f = damaged / "store" / origin["paths"]["single.txt"]
    os.chmod(f, 0o644)
    os.truncate(f, 10)
    fim(origin, damaged, "verify", "--check-contents", check=4)
    fim(origin, damaged, "verify", "--check-contents", "--repair", check=0)
    assert f.read_text() == "a single-file store path\n" * 100
    fim(origin, damaged, "verify", "--check-contents", check=0)


def test_repair_of_a_file_chmod_ed_through_its_path(origin, damaged):
    """A store file is its blob: a chmod to executable damages every path linking to it.
    The repaired path gets a fresh blob of the right mode (the damaged one is not reused)."""
    f = damaged / "store" / origin["paths"]["t1"] / "own.txt"
    os.chmod(f, 0o555)
    before = fim(origin, damaged, "verify", "--check-contents", check=4).stdout
    assert "own.txt: executable bit differs" in before
    fim(origin, damaged, "verify", "--check-contents", "--repair", check=0)
    assert os.stat(f).st_mode & 0o777 == 0o444 and f.read_text() == "only in t1\n"
    fim(origin, damaged, "verify", "--check-contents", check=0)


def test_offline_repair_uses_the_file_caches_and_connects_to_nothing_else(origin, damaged):
    from offlinefixtures import ConnectionRecorder

    recorder = ConnectionRecorder()
    try:
        config = write_config(damaged.parent / "offline.toml", trusted=[origin["pk"]],
                              substituters=[f"http://127.0.0.1:{recorder.port}", f"file://{origin['cache']}"])
        with open(config, "a") as f:
            f.write("offline = true\n")
        f = damaged / "store" / origin["paths"]["single.txt"]
        os.chmod(f, 0o644)
        os.truncate(f, 10)
        proc = fim(origin, damaged, "verify", "--check-contents", "--repair", config=config, check=0)
        assert f"offline: not using http://127.0.0.1:{recorder.port}" in proc.stderr
        assert f.read_text() == "a single-file store path\n" * 100
    finally:
        recorder.close()
    assert recorder.connections == 0


def test_repair_of_a_reference_whose_record_is_gone(origin, damaged):
    app = StorePath.parse(origin["paths"]["app"])
    store = LocalStore(str(damaged), STORE_DIR)
    try:
        (lib,) = [r for r in store.info(app).references if r != app]
        with store.db.write() as txn:
            store.invalidate(txn, store.info(lib))
    finally:
        store.close()
    out = fim(origin, damaged, "verify", check=4).stdout
    assert f"references '{STORE_DIR}/{lib.base}', which is not valid" in out
    fim(origin, damaged, "verify", "--repair", check=0)
    fim(origin, damaged, "verify", "--check-contents", check=0)


def test_a_cache_with_another_digest_is_refused(origin, tmp_path):
    """The same output path built twice by a non-reproducible builder: the cache's copy has
    another root digest. Repair must not adopt it (Nix would, silently)."""
    sk, pk = make_keys("other-1")
    (tmp_path / "sk").write_text(str(sk) + "\n")
    (tmp_path / "r.toml").write_text('name = "noisy"\nargs = ["-c", "mkdir $out; head -c 16 /dev/urandom > '
                                     '$out/random; echo stable > $out/stable"]\n' + SH)
    cache = tmp_path / "cache"
    plain = write_config(tmp_path / "plain.toml", trusted=[pk])
    theirs = faults.fim(["realise", "--no-out-link", tmp_path / "r.toml"], tmp_path / "B", plain, check=0).stdout.strip()
    faults.fim(["push", f"file://{cache}", theirs, "--key", tmp_path / "sk"], tmp_path / "B", plain, check=0)
    cfg = write_config(tmp_path / "config.toml", trusted=[pk], substituters=[f"file://{cache}"])
    mine = faults.fim(["realise", "--no-out-link", "--no-substitute", tmp_path / "r.toml"], tmp_path / "A", cfg,
                      check=0).stdout.strip()
    assert os.path.basename(mine) == os.path.basename(theirs)
    f = pathlib.Path(mine) / "stable"
    flip(f, 0)
    damaged = f.read_bytes()
    p = run_fimio(["verify", "--check-contents", "--repair"], tmp_path / "A", env={"FIMIO_CONFIG": cfg})
    assert_one_error_line(p, 4, "1 problem(s)")
    assert "refused" in p.stdout and "not the registered blake3:" in p.stdout, p.stdout
    assert f.read_bytes() == damaged  # left as it was: the registered digest still says it is damaged


def test_without_a_usable_substituter_repair_reports_why(origin, damaged, tmp_path):
    f = damaged / "store" / origin["paths"]["t1"] / "own.txt"
    flip(f, 0)
    none = write_config(tmp_path / "none.toml", trusted=[origin["pk"]])
    p = fim(origin, damaged, "verify", "--check-contents", "--repair", config=none)
    assert_one_error_line(p, 4, "1 problem(s)")
    assert "not repaired: no substituter configured" in p.stdout
    unreachable = write_config(tmp_path / "down.toml", trusted=[origin["pk"]], substituters=["http://127.0.0.1:9"])
    p = fim(origin, damaged, "verify", "--check-contents", "--repair", config=unreachable)
    assert_one_error_line(p, 4)
    assert "not repaired" in p.stdout and "127.0.0.1:9" in p.stdout, p.stdout
    assert "does not have it" not in p.stdout, "an unreachable cache was said to lack the path"
    # a second damaged path: its reason is the same unreachable cache, not "no substituter has it"
    g = damaged / "store" / origin["paths"]["t2"] / "own.txt"
    flip(g, 0)
    p = fim(origin, damaged, "verify", "--check-contents", "--repair", config=unreachable)
    lines = [line for line in p.stdout.splitlines() if "not repaired" in line]
    assert len(lines) == 2 and all("127.0.0.1:9" in line for line in lines), p.stdout
    os.chmod(g, 0o644)
    g.write_text("only in t2\n")  # whole again: the rest of this test repairs t1 alone
    empty = tmp_path / "empty-cache"
    empty.mkdir()
    lacking = write_config(tmp_path / "lacking.toml", trusted=[origin["pk"]], substituters=[f"file://{empty}"])
    p = fim(origin, damaged, "verify", "--check-contents", "--repair", config=lacking)
    assert_one_error_line(p, 4)
    assert "not repaired" in p.stdout and "does not have it" in p.stdout
    fim(origin, damaged, "verify", "--check-contents", "--repair", check=0)  # the real cache fixes it


def test_a_killed_repair_leaves_the_path_damaged_or_whole(origin, damaged):
    """SIGKILL ``verify --repair`` at random moments: the path is swapped in one rename, so it
    is either still the damaged copy or the repaired one -- never missing nor mixed."""
    p = origin["paths"]
    rnd = random.Random(faults.SEED)
    env = fimio_env(damaged, {"FIMIO_CONFIG": origin["config"]})
    outcomes = []
    for i in range(6):
        flip(damaged / "store" / p["t1"] / "big.bin", 1000 + i)
        start = time.monotonic()
        proc = subprocess.Popen([fimio_executable(), "verify", "--check-contents", "--repair"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(0.15, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        check = fim(origin, damaged, "verify", "--check-contents")
        lines = check.stdout.splitlines()
        assert all("big.bin: contents differ" in line for line in lines), (i, time.monotonic() - start, lines)
        outcomes.append("damaged" if lines else "repaired")
        fim(origin, damaged, "verify", "--check-contents", "--repair", check=0)
        fim(origin, damaged, "verify", "--check-contents", check=0)
        assert os.listdir(damaged / "tmp") == []
    print(outcomes)
