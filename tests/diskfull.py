"""Disk-full scenarios (a helper, not a test module): run by ``test_diskfull.py`` inside a
private mount namespace whose store root is a small tmpfs, so nothing leaks to the host::

    unshare -m --propagation private sh -c \\
        'mount -t tmpfs -o size=8m tmpfs MNT && exec python diskfull.py SCENARIO MNT WORK'

Each scenario runs the real console script against roots on the tmpfs (sources, caches and
derivation files live in WORK, on the ordinary disk) and prints one JSON list of steps:
``{"case", "step", "rc", "stderr", ...}`` plus store states (valid paths, garbage left in
``store/`` and ``tmp/``). The test judges them; this file only records.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from conftest import STORE_DIR, fimio_env, fimio_executable  # noqa: E402

PAGE = 4096


def fimio(args, root, config=None, timeout: float = 300) -> dict:
    env = fimio_env(root, {"FIMIO_CONFIG": config} if config else None)
    try:
        p = subprocess.run([fimio_executable(), *map(str, args)], env=env, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"rc": "hung", "stderr": (e.stderr or b"").decode(errors="replace"), "stdout": ""}
    return {"rc": p.returncode, "stderr": p.stderr, "stdout": p.stdout}


def state(root) -> dict:
    from fimio.store.local import LocalStore

    s = LocalStore(str(root), STORE_DIR)
    try:
        valid = sorted(i.path.base for i in s.all_paths())
        garbage = sorted(e for e in os.listdir(s.store) if e != ".links" and e not in valid)
        logs = os.path.join(str(root), "logs")
        stray_logs = sorted(n for n in os.listdir(logs) if not n.endswith(".log.zst")) if os.path.isdir(logs) else []
        return {"valid": valid, "garbage": garbage, "tmp": sorted(os.listdir(s.tmp)) + stray_logs}
    finally:
        s.close()


def fill(mnt: str, leave: int) -> str:
    """Fill the tmpfs, then give back ``leave`` bytes; return the filler's path."""
    path = os.path.join(mnt, "filler")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    block = b"\0" * (1 << 16)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError:
                break
        while True:
            try:
                os.write(fd, b"\0" * PAGE)
            except OSError:
                break
        size = os.fstat(fd).st_size
        os.ftruncate(fd, max(0, size - leave))
    finally:
        os.close(fd)
    return path


def make_tree(directory: str, files: int, size: int, seed: int = 1) -> str:
    import random

    rnd = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    for i in range(files):
        d = os.path.join(directory, f"d{i % 5}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"f{i}"), "wb") as f:
            f.write(rnd.randbytes(size))
    return directory


def run_case(out: list, case: str, root: str, command: list, config=None, filler: str | None = None,
             small: str | None = None, timeout: float = 300) -> None:
    """One command that may meet a full disk, then the checks of a usable store."""
    r = fimio(command, root, config, timeout)
    out.append({"case": case, "step": "command", **r})
    if not os.path.isdir(os.path.join(root, "db")):
        return  # could not even create the store: nothing to check
    r = fimio(["verify", "--check-contents"], root, config)
    out.append({"case": case, "step": "verify", **r, "state": state(root)})
    if filler:
        os.unlink(filler)  # free space
    r = fimio(["gc"], root, config)
    out.append({"case": case, "step": "gc", **r})
    if small:
        r = fimio(["add", small], root, config)
        out.append({"case": case, "step": "small-add", **r})
    r = fimio(["verify", "--check-contents"], root, config)
    out.append({"case": case, "step": "verify-after", **r, "state": state(root)})


def scenario_add(mnt: str, work: str, out: list) -> None:
    """A 12 MB tree into an 8 MB store; then free-space levels from 0 to 144 KiB for a
    small tree (ENOSPC in blob writes, materialisation, rename, LMDB commit)."""
    small = os.path.join(work, "small.txt")
    with open(small, "w") as f:
        f.write("hello\n")
    big = make_tree(os.path.join(work, "big"), 30, 400_000)
    root = os.path.join(mnt, "r-big")
    run_case(out, "add-big", root, ["add", big], small=small)
    shutil.rmtree(root)
    tree = make_tree(os.path.join(work, "tree"), 24, 3000, seed=2)
    for leave in range(0, 144 * 1024 + 1, 24 * 1024):
        root = os.path.join(mnt, f"r{leave}")
        fimio(["verify"], root)  # an empty store, created before the disk fills
        filler = fill(mnt, leave)
        run_case(out, f"add-free-{leave // 1024}k", root, ["add", tree], filler=filler, small=small)
        shutil.rmtree(root)


def scenario_realise(mnt: str, work: str, out: list) -> None:
    """A builder writing a 2 MB output and a 12 MB one into an 8 MiB store (the second fails
    inside the build); then builders that fill the disk up to 0-160 KiB from full, so the
    failure comes after the build: writing the log, adopting blobs, the rename, the commit."""
    small = os.path.join(work, "small.txt")
    with open(small, "w") as f:
        f.write("hello\n")
    fill_to = "avail=$(df -k --output=avail $out | tail -1); head -c $(( (avail - {leave}) * 1024 )) /dev/zero > $out/data"
    cases = [("2000kb", "head -c 2000000 /dev/zero > $out/data"), ("12000kb", "head -c 12000000 /dev/zero > $out/data")]
    cases += [(f"full-less-{k}k", fill_to.format(leave=k)) for k in (0, 8, 24, 48, 96, 160)]
    # -v: the build's output goes through fimio to the log and the terminal; the disk is full
    # before the builder says much, and the builder must still be read to its end
    cases += [("chatty-v", fill_to.format(leave=0) + "; i=0; while [ $i -lt 20000 ]; do "
                           "echo line $i padding padding padding; i=$((i+1)); done; exit 1")]
    for name, script in cases:
        drv = os.path.join(work, f"{name}.toml")
        with open(drv, "w") as f:
            f.write(f'name = "{name}"\nbuilder = "/bin/sh"\n'
                    f'args = ["-c", {json.dumps("mkdir $out; " + script + "; echo done > $out/flag")}]\n'
                    '[env]\nPATH = "/usr/bin:/bin"\n[sandbox]\nhost_paths = ["/usr", "/bin", "/lib", "/lib64"]\n')
        root = os.path.join(mnt, f"r-{name}")
        verbose = ["-v"] if name.endswith("-v") else []
        run_case(out, f"realise-{name}", root, ["realise", *verbose, "--no-out-link", drv], small=small, timeout=120)
        shutil.rmtree(root)


def scenario_substitute(mnt: str, work: str, out: list) -> None:
    """Substituting from a file:// cache (on the ordinary disk) paths of 2-12 MB into an 8 MB store."""
    from cachefixtures import make_keys, write_config

    small = os.path.join(work, "small.txt")
    with open(small, "w") as f:
        f.write("hello\n")
    sk, pk = make_keys("diskfull-1")
    with open(os.path.join(work, "sk"), "w") as f:
        f.write(str(sk) + "\n")
    config = write_config(os.path.join(work, "config.toml"), trusted=[pk])
    cache = f"file://{os.path.join(work, 'cache')}"
    source = os.path.join(work, "source")
    for mb in (2, 5, 7, 12):
        tree = make_tree(os.path.join(work, f"t{mb}"), mb * 4, 250_000, seed=mb)
        path = fimio(["add", tree], source, config)["stdout"].strip()
        p = fimio(["push", cache, path, "--key", os.path.join(work, "sk")], source, config)
        assert p["rc"] == 0, p
        logical = STORE_DIR + "/" + os.path.basename(path)
        root = os.path.join(mnt, f"r{mb}")
        run_case(out, f"substitute-{mb}mb", root, ["copy", "--from", cache, logical], config=config, small=small)
        shutil.rmtree(root)


def scenario_inodes(mnt: str, work: str, out: list) -> None:
    """Out of inodes (tmpfs nr_inodes): a tree of 600 tiny files."""
    small = os.path.join(work, "small.txt")
    with open(small, "w") as f:
        f.write("hello\n")
    tree = make_tree(os.path.join(work, "many"), 600, 10, seed=3)
    root = os.path.join(mnt, "r")
    run_case(out, "add-inodes", root, ["add", tree], small=small)


def scenario_push(mnt: str, work: str, out: list) -> None:
    """Pushing 2-12 MB paths from a store on the ordinary disk to a file:// cache on the
    8 MB tmpfs: the ones that do not fit fail with one line, and leave no partial upload."""
    source = os.path.join(work, "source")
    cache_dir = os.path.join(mnt, "cache")
    for mb in (2, 12):
        tree = make_tree(os.path.join(work, f"t{mb}"), mb * 4, 250_000, seed=mb)
        path = fimio(["add", tree], source)["stdout"].strip()
        r = fimio(["push", f"file://{cache_dir}", path], source)
        leftovers = sorted(os.listdir(os.path.join(cache_dir, ".tmp"))) if os.path.isdir(
            os.path.join(cache_dir, ".tmp")) else []
        out.append({"case": f"push-{mb}mb", "step": "command", **r})
        out.append({"case": f"push-{mb}mb", "step": "cache-tmp", "rc": 0, "stderr": "", "stdout": "",
                    "state": {"garbage": [], "tmp": leftovers}})


SCENARIOS = {"push": scenario_push, "add": scenario_add, "realise": scenario_realise, "substitute": scenario_substitute,
             "inodes": scenario_inodes}


def main() -> None:
    name, mnt, work = sys.argv[1:4]
    out: list = []
    try:
        SCENARIOS[name](mnt, work, out)
    except BaseException as e:  # report, do not hide, a driver failure
        out.append({"case": "driver", "step": "crash", "rc": -1, "stderr": repr(e), "stdout": ""})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
