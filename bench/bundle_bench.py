"""bundle: moving the *big* closure to another store through one file, against Nix.

fimio: ``fimio export P --closure -o F --key K`` (signed, zstd level 2, the default), then
``fimio import F`` into a fresh, empty store that trusts K (every signature and digest is
verified, and the import is durable: one ``syncfs`` before registration).

Nix: ``nix-store --export $(nix-store -qR P) > F`` then ``nix-store --store D --import < F``
into a fresh chroot store ``D`` (Nix's import of a path already valid is a no-op): both
tools import into a store that lacks every byte of the tree. The round trip's peer is
what the issue names, the pipeline ``nix-store --export … | nix-store --store D2 --import``
into another fresh store, timed as a whole (the two run at once; on two CPUs that is not
always shorter than their sum). fimio's round trip is measured both ways, each against that
pipeline: its export then its import, and ``fimio export … -o - | fimio import -``. Nix's
export is unsigned and uncompressed and its import does not fsync file contents; fimio
does more work per byte, which the ratio includes.

Every timed command is a whole process as a user runs it; ``sync()`` (untimed) before each.
The ``-qR`` query of Nix and the creation of both tools' empty target stores are untimed.
Target stores are created under the scratch parent (common.scratch_parent) and deleted only
after the rounds, and the first round waits out the last large deletion (see README). The
big tree is added once to each tool's store (untimed) before the runs; the rounds
alternate between the tools so that a change in machine load affects both.

Floor (a note under the table, see common.floor_time): each round also times the same
move with C tools, ``tar | zstd -1 -T0 | zstd -d | tar -x`` into a new directory, then
``sync -f``: no signatures, no digests, no store.
"""

from __future__ import annotations

import os
import subprocess
import time

import trees
from common import (Row, Sample, fimio_argv, fimio_env, floor_note, floor_time, log, median, note_deletion,
                    remove_tree, run_cmd, scratch_parent, settle, wait_after_deletion)

NAME = "bundle"
HELP = "export + import of the big closure through one file, fimio vs nix-store --export/--import"

ROUNDTRIP_TARGET = 0.5  # × nix
RSS_TARGET = 150e6  # bytes, fimio import


def add_arguments(p) -> None:
    p.add_argument("--runs", type=int, default=3, help="export/import rounds per tool (median; default 3)")


def _run_stdin(argv: list[str], stdin_path: str, env=None) -> Sample:
    """Like common.run_cmd, with stdin from a file (for nix-store --import)."""
    with open(stdin_path, "rb") as f:
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, env=env, stdin=f, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        err = p.stderr.read()
        p.stderr.close()
        _, status, ru = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}: {err.decode(errors='replace')[-2000:]}")
    return Sample(seconds, ru.ru_maxrss * 1024, p.returncode, b"", err)


class _Fimio:
    def __init__(self, workdir: str):
        self.argv = fimio_argv()
        self.base = os.path.join(workdir, "bundle", f"run-{os.getpid()}")
        remove_tree(self.base)
        os.makedirs(self.base)
        self.workdir = workdir
        self.counter = 0
        self.roots: list[str] = []
        from fimio.store.cache.keys import SecretKey

        key = SecretKey.generate("bench-1")
        self.key = os.path.join(self.base, "bench.secret")
        with open(self.key, "w") as f:
            f.write(str(key) + "\n")
        self.config = os.path.join(self.base, "config.toml")
        with open(self.config, "w") as f:
            f.write(f'trusted-public-keys = ["{key.public_key()}"]\n')

    def env(self, root: str) -> dict:
        env = fimio_env(root)
        env["FIMIO_CONFIG"] = self.config
        return env

    def fresh_dir(self, label: str) -> str:
        """A new directory in a block group of its own (see common.scratch_parent), deleted
        only after the timed rounds, so that no round creates its files where an earlier
        round just freed inodes."""
        self.counter += 1
        path = os.path.join(scratch_parent(self.workdir), f"bundle-{label}-{os.getpid()}-{self.counter}")
        self.roots.append(path)
        return path

    def fresh_root(self, label: str) -> str:
        """A new, initialised fimio store (see fresh_dir)."""
        root = self.fresh_dir(label)
        subprocess.run([_python(), "-c", "import sys; from fimio.store.local import LocalStore; "
                        "LocalStore.open(sys.argv[1]).close()", root], check=True)
        return root


def _fimio_piped(f: _Fimio, path: str, src: str) -> float:
    """``fimio export P --closure -o - | fimio import -`` into a fresh store, as one."""
    dest = f.fresh_root("dest-piped")
    settle()
    return _time_pipe([*f.argv, "export", path, "--closure", "-o", "-", "--key", f.key, "-q"], f.env(src),
                      [*f.argv, "import", "-", "-q"], f.env(dest))


def _time_pipe(producer: list[str], producer_env, consumer: list[str], consumer_env) -> float:
    """Seconds from starting ``producer | consumer`` until both have exited (both must succeed)."""
    t0 = time.perf_counter()
    first = subprocess.Popen(producer, env=producer_env, stdout=subprocess.PIPE)
    second = subprocess.Popen(consumer, env=consumer_env, stdin=first.stdout, stdout=subprocess.DEVNULL)
    first.stdout.close()
    codes = first.wait(), second.wait()
    if codes != (0, 0):
        raise RuntimeError(f"{producer[0]} … | {consumer[0]} … failed (exit {codes[0]} | {codes[1]})")
    return time.perf_counter() - t0


def _python() -> str:
    import sys

    return sys.executable


def run(args, workdir: str, nix: bool, notes: list[str]):
    big = trees.make_big(workdir, args.seed)
    wait_after_deletion(workdir)
    f = _Fimio(workdir)
    n = args.runs
    log(f"bundle: adding the big tree to the stores (untimed), then {n} rounds, each tool in turn "
        "(interleaved, so that a change in machine load hits both)")
    src = f.fresh_root("src")
    path = run_cmd([*f.argv, "add", big.path], env=f.env(src)).stdout.decode().strip()
    bundle = os.path.join(f.base, "big.bundle")
    peer = _Nix(big, f.base, f.fresh_dir) if nix else None
    exp, imp, rss, pipe, nexp, nimp, nrss, npipe, floor = [], [], [], [], [], [], [], [], []
    try:
        for i in range(n):
            settle()
            exp.append(run_cmd([*f.argv, "export", path, "--closure", "-o", bundle, "--key", f.key, "-q"],
                               env=f.env(src)).seconds)
            dest = f.fresh_root("dest")
            settle()
            s = run_cmd([*f.argv, "import", bundle, "-q"], env=f.env(dest))
            imp.append(s.seconds)
            rss.append(s.maxrss_bytes)
            pipe.append(_fimio_piped(f, path, src))
            floor.append(floor_time('tar -C "$P" -cf - "$N" | zstd -q -1 -T0 | zstd -qd | tar -x -C "$D" && sync -f "$D"',
                                    f.fresh_dir("floor"), P=os.path.dirname(big.path), N=os.path.basename(big.path)))
            line = (f"  round {i + 1}: fimio export {exp[-1]:.2f} s, import {imp[-1]:.2f} s ({rss[-1] / 1e6:.0f} MB), "
                    f"export | import {pipe[-1]:.2f} s, floor {floor[-1].seconds:.2f} s")
            if peer is not None:
                e, m, r, piped = peer.round()
                nexp.append(e)
                nimp.append(m)
                nrss.append(r)
                npipe.append(piped)
                line += f"; nix export {e:.2f} s, import {m:.2f} s ({r / 1e6:.0f} MB), export | import {piped:.2f} s"
            log(line)
        bundle_size = os.path.getsize(bundle)
        nar_size = peer.size if peer is not None else None
    finally:
        if peer is not None:
            peer.close()
        log("deleting scratch stores")
        for root in f.roots:
            remove_tree(root)
        remove_tree(f.base)
        note_deletion(workdir)
    rows = []
    label = f"*big* ({big.files:,} files, {big.bytes / 1e6:,.0f} MB), median of {n}"
    rows.append(Row(f"export {label}", "time", median(exp), median(nexp) if nexp else None,
                    fimio_samples=exp, peer_samples=nexp))
    rows.append(Row(f"import into an empty store, {label}", "time", median(imp), median(nimp) if nimp else None,
                    fimio_samples=imp, peer_samples=nimp))
    trip = [a + b for a, b in zip(exp, imp)]
    for what, samples in (("export, then import", trip), ("export piped into import", pipe)):
        r = Row(f"{what} (nix: export piped into import), {label}", "time", median(samples),
                median(npipe) if npipe else None, f"≤ {ROUNDTRIP_TARGET}× nix", fimio_samples=samples,
                peer_samples=npipe)
        r.met = None if r.ratio is None else r.ratio <= ROUNDTRIP_TARGET
        rows.append(r)
    r = Row("import peak RSS", "bytes", max(rss), max(nrss) if nrss else None, f"fimio ≤ {RSS_TARGET / 1e6:.0f} MB")
    r.met = max(rss) <= RSS_TARGET
    rows.append(r)
    rows.append(Row("file size (bundle vs NAR export)", "bytes", bundle_size, nar_size))
    notes.append(floor_note("the round trip: tar | zstd -1 -T0 | zstd -d | tar -x, then sync -f", floor,
                            median(npipe) if npipe else None, ROUNDTRIP_TARGET))
    notes.append("fimio: signed with one key, zstd level 2, import verifies signatures and digests and syncs; "
                 "nix: unsigned, uncompressed, imported into a fresh chroot store (--store DIR, initialised untimed)")
    return rows, [big]


class _Nix:
    """The peer's side: the tree added once; each round exports the closure and imports it
    into a fresh, initialised Nix store of its own (``--store DIR``, a chroot store, created
    untimed next to fimio's scratch stores): like fimio, Nix imports into a store that lacks
    every byte, and neither tool creates files where the other just deleted some."""

    def __init__(self, big, base: str, fresh_dir):
        log("  nix: adding the big tree (untimed)")
        self.path = run_cmd(["nix-store", "--add", big.path]).stdout.decode().strip()
        self.closure = run_cmd(["nix-store", "-qR", self.path]).stdout.decode().split()
        self.nar = os.path.join(base, "big.nar-export")
        self.size = None
        self.fresh_dir = fresh_dir

    def round(self) -> tuple[float, float, int]:
        settle()
        with open(self.nar, "wb") as out:
            e = run_cmd(["nix-store", "--export", *self.closure], stdout=out).seconds
        self.size = os.path.getsize(self.nar)
        store = self.fresh_dir("nix")
        subprocess.run(["nix-store", "--store", store, "--init"], capture_output=True, check=True)
        settle()
        s = _run_stdin(["nix-store", "--store", store, "--import"], self.nar)
        return e, s.seconds, s.maxrss_bytes, self._piped()

    def _piped(self) -> float:
        """``nix-store --export … | nix-store --store D --import`` into a fresh store, as one."""
        store = self.fresh_dir("nix-piped")
        subprocess.run(["nix-store", "--store", store, "--init"], capture_output=True, check=True)
        settle()
        return _time_pipe(["nix-store", "--export", *self.closure], None, ["nix-store", "--store", store, "--import"],
                          None)

    def close(self) -> None:
        subprocess.run(["nix-store", "--delete", self.path], capture_output=True)
        if os.path.exists(self.nar):
            os.unlink(self.nar)
