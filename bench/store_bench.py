"""Benchmark group ``store``: putting trees into the store and reading them back as NARs.

Peer: Nix (``nix-store --add`` / ``--dump``), run on the same trees in the same session.

1. add *std*, content changed each run (a unique marker file is written into the tree before
   every run, so neither tool finds the whole path already valid). fimio is measured twice:
   into a fresh, empty store every run (every file is new to it), and into one store per
   series that holds the earlier versions (fimio deduplicates file contents; Nix does not,
   so its figure is the same for both rows).
2. add *big*, one run each by default (fresh fimio store).
3. dump the added *big* path to /dev/null, warm page cache: throughput in GB/s of NAR bytes.
   Also checks, untimed, that both dumps are byte-identical.
4. peak RSS of adding a 2 GiB file (``ru_maxrss`` of that child via ``wait4``).

Floors (notes under the table, see common.copy_floors): each add run also times ``cp -a`` of
the tree followed by ``sync -f``, the least any tool that stores a durable copy does, and the
same copy spread over every CPU (the directories first, then batches of 256 entries on one
``cp`` per CPU), which is what a tool that copies in parallel, as fimio does, is up against.

Every timed command is a whole process, start-up included, as a user runs it. Before each
run the tree is read once (untimed), so that the tool that goes first does not pay alone
for a cold page cache. Before each timed command the harness calls ``sync()`` (untimed) so
that no run pays for writing back what an earlier command left dirty. Each fimio series
uses a fresh ``FIMIO_ROOT`` under the work directory (the same filesystem as the trees);
paths added to the Nix store are deleted again after each run (untimed).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import trees
from common import (Row, copy_floors, fimio_argv, fimio_env, floor_note, log, median, note_deletion, remove_tree,
                    run_cmd, scratch_parent, settle, wait_after_deletion, warm_tree)

NAME = "store"
HELP = "add (std, big), dump (big), peak memory of a 2 GiB add; against nix-store"

ADD_STD_TARGET = 0.7
ADD_BIG_TARGET = 0.5
DUMP_TARGET = 1e9  # bytes/s
RSS_TARGET = 100e6  # bytes


def add_arguments(p) -> None:
    p.add_argument("--runs", type=int, default=5, help="runs per median for add std and dump (default 5)")
    p.add_argument("--big-runs", type=int, default=1, help="runs of add big (default 1)")
    p.add_argument("--only", action="append", choices=["add-std", "add-big", "dump", "rss"],
                   help="run only these parts (repeatable); dump implies add-big")


class _Ctx:
    def __init__(self, args, workdir: str, nix: bool, notes: list[str]):
        self.args, self.workdir, self.nix, self.notes = args, workdir, nix, notes
        self.fimio = fimio_argv()
        self.counter = 0
        self.roots: list[str] = []  # scratch stores, deleted after the timed runs
        self.nix_paths: list[str] = []  # paths this group added to the Nix store

    def fresh_root(self, label: str) -> str:
        root = self.scratch(label)
        remove_tree(root)
        os.makedirs(root)
        # create the store layout and database untimed: the timed add is not a first-ever start
        from_python = ("import sys; from fimio.store.local import LocalStore; "
                       "LocalStore.open(sys.argv[1]).close()")
        subprocess.run([_python(), "-c", from_python, root], check=True)
        return root

    def scratch(self, label: str) -> str:
        """A name for a new directory next to the scratch stores (deleted with them)."""
        self.counter += 1
        path = os.path.join(scratch_parent(self.workdir), f"{label}-{os.getpid()}-{self.counter}")
        self.roots.append(path)
        return path

    def fimio_add(self, root: str, path: str):
        settle()
        s = run_cmd([*self.fimio, "add", path], env=fimio_env(root))
        return s, s.stdout.decode().strip()

    def nix_add(self, path: str):
        settle()
        s = run_cmd(["nix-store", "--add", path])
        p = s.stdout.decode().strip()
        self.nix_paths.append(p)
        return s, p

    def cleanup(self) -> None:
        """Delete every scratch store and added Nix path (after the timed runs)."""
        if not self.roots and not self.nix_paths:
            return
        log("deleting scratch stores and added Nix paths")
        for root in self.roots:
            remove_tree(root)
        for p in dict.fromkeys(self.nix_paths):
            subprocess.run(["nix-store", "--delete", p], capture_output=True)
        self.roots, self.nix_paths = [], []
        note_deletion(self.workdir)


def _python() -> str:
    import sys

    return sys.executable


def _write_marker(tree: str, run: int) -> None:
    with open(os.path.join(tree, trees.MARKER), "w") as f:
        f.write(f"run {run} {time.time_ns()} {os.urandom(8).hex()}\n")


def _remove_marker(tree: str) -> None:
    try:
        os.unlink(os.path.join(tree, trees.MARKER))
    except FileNotFoundError:
        pass


def run(args, workdir: str, nix: bool, notes: list[str]) -> tuple[list[Row], list]:
    ctx = _Ctx(args, workdir, nix, notes)
    only = set(args.only or ["add-std", "add-big", "dump", "rss"])
    if "dump" in only:
        only.add("add-big")
    rows: list[Row] = []
    used = []
    # build (or find) every tree first: generating them deletes and creates many files
    if "add-std" in only:
        used.append(trees.make_std(workdir))
    if "add-big" in only:
        used.append(trees.make_big(workdir, args.seed))
    if "rss" in only:
        used.append(trees.make_large(workdir))
    wait_after_deletion(workdir)
    load = os.getloadavg()[0]
    try:
        for tree in used:
            if tree.kind == "std":
                rows += _add_std(ctx, tree)
            elif tree.kind == "big":
                big_rows, kept = _add_big(ctx, tree)
                rows += big_rows
                if "dump" in only:
                    rows += _dump(ctx, tree, *kept)
            else:
                rows += _rss(ctx, tree)
    finally:
        for tree in used:
            if tree.kind != "large":
                _remove_marker(tree.path)
        notes.append(f"load average (1 min) at the first timed run {load:.1f}, after the last "
                     f"{os.getloadavg()[0]:.1f}, on {os.cpu_count()} CPUs")
        ctx.cleanup()
    return rows, used


def _add_std(ctx: _Ctx, std) -> list[Row]:
    n = ctx.args.runs
    log(f"add std: {n} runs ({std.describe()})")
    series_root = ctx.fresh_root("std-series")
    fresh, series, peer, floor = [], [], [], []
    for i in range(n):
        _write_marker(std.path, i)
        warm_tree(std.path)
        root = ctx.fresh_root("std-fresh")
        s, _ = ctx.fimio_add(root, std.path)
        fresh.append(s.seconds)
        s, _ = ctx.fimio_add(series_root, std.path)
        series.append(s.seconds)
        if ctx.nix:
            s, _ = ctx.nix_add(std.path)
            peer.append(s.seconds)
        floor.append(copy_floors(std.path, lambda label: ctx.scratch(f"std-{label}")))
        log(f"  run {i + 1}: fimio fresh {fresh[-1]:.3f} s, fimio series {series[-1]:.3f} s"
            + (f", nix {peer[-1]:.3f} s" if peer else "")
            + f", floors {floor[-1][0].seconds:.3f} s / {floor[-1][1].seconds:.3f} s")
    pm = median(peer) if peer else None
    ctx.notes.extend(_floor_notes("add *std*", floor, pm, ADD_STD_TARGET))
    rows = []
    for label, xs in ((f"add *std* ({std.files:,} files, {std.bytes / 1e6:.0f} MB), empty store, median of {n}", fresh),
                      (f"add *std*, store holding earlier versions, median of {n}", series)):
        r = Row(label, "time", median(xs), pm, f"≤ {ADD_STD_TARGET}× nix", fimio_samples=xs, peer_samples=peer)
        r.met = None if r.ratio is None else r.ratio <= ADD_STD_TARGET
        rows.append(r)
    return rows


def _add_big(ctx: _Ctx, big):
    n = ctx.args.big_runs
    log(f"add big: {n} run(s) ({big.describe()})")
    mine, peer, floor = [], [], []
    kept_root = kept_fimio = kept_nix = None
    for i in range(n):
        _write_marker(big.path, 1000 + i)
        warm_tree(big.path)
        kept_root = ctx.fresh_root("big")
        s, kept_fimio = ctx.fimio_add(kept_root, big.path)
        mine.append(s.seconds)
        if ctx.nix:
            s, kept_nix = ctx.nix_add(big.path)
            peer.append(s.seconds)
        floor.append(copy_floors(big.path, lambda label: ctx.scratch(f"big-{label}")))
        log(f"  run {i + 1}: fimio {mine[-1]:.2f} s" + (f", nix {peer[-1]:.2f} s" if peer else "")
            + f", floors {floor[-1][0].seconds:.2f} s / {floor[-1][1].seconds:.2f} s")
    ctx.notes.extend(_floor_notes("add *big*", floor, median(peer) if peer else None, ADD_BIG_TARGET))
    label = f"add *big* ({big.files:,} files, {big.bytes / 1e6:,.0f} MB), empty store, " + (
        "one run" if n == 1 else f"median of {n}")
    r = Row(label, "time", median(mine), median(peer) if peer else None, f"≤ {ADD_BIG_TARGET}× nix",
            fimio_samples=mine, peer_samples=peer)
    r.met = None if r.ratio is None else r.ratio <= ADD_BIG_TARGET
    return [r], (kept_root, kept_fimio, kept_nix)


def _floor_notes(what: str, floors: list, peer: float | None, target: float) -> list[str]:
    return [floor_note(f"{what}: a durable copy (cp -a, then sync -f)", [f[0] for f in floors], peer, target),
            floor_note(f"{what}: a durable parallel copy (cp on every CPU, then sync -f)", [f[1] for f in floors],
                       peer, target)]


def _nar_digest(argv: list[str], env=None) -> tuple[str, int]:
    h = hashlib.sha256()
    size = 0
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE) as p:
        while chunk := p.stdout.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {p.returncode}")
    return h.hexdigest(), size


def _dump(ctx: _Ctx, big, root: str, fimio_path: str, nix_path: str | None) -> list[Row]:
    n = ctx.args.runs
    log(f"dump big: warm-up and {n} runs each")
    env = fimio_env(root)
    fargv = [*ctx.fimio, "dump", fimio_path]
    try:
        fdigest, size = _nar_digest(fargv, env)  # also the warm-up
    except RuntimeError as e:
        ctx.notes.append(f"fimio dump failed, dump not measured: {e}")
        return [Row("dump *big* to /dev/null (warm)", "rate", None, None, "≥ 1 GB/s", note="failed")]
    nargv = ["nix-store", "--dump", nix_path] if nix_path else None
    if nargv:
        ndigest, nsize = _nar_digest(nargv)
        same = ndigest == fdigest and nsize == size
        ctx.notes.append(f"dump of *big*: NAR {size:,} bytes; fimio's and nix's archives are "
                         + ("byte-identical (sha256 " + fdigest[:16] + "…)" if same else
                            f"DIFFERENT (fimio {size:,} bytes sha256 {fdigest[:16]}…, nix {nsize:,} bytes {ndigest[:16]}…)"))
    mine, peer = [], []
    with open(os.devnull, "wb") as null:
        for i in range(n):
            settle()
            mine.append(run_cmd(fargv, env=env, stdout=null).seconds)
            if nargv:
                settle()
                peer.append(run_cmd(nargv, stdout=null).seconds)
    rates = [size / t for t in mine]
    prates = [size / t for t in peer]
    r = Row(f"dump *big* to /dev/null, warm, median of {n} (NAR {size / 1e6:,.0f} MB)", "rate",
            median(rates), median(prates) if prates else None, "≥ 1 GB/s",
            fimio_samples=rates, peer_samples=prates)
    r.met = r.fimio >= DUMP_TARGET
    return [r]


def _rss(ctx: _Ctx, large) -> list[Row]:
    log(f"peak RSS: add of {large.describe()}")
    root = ctx.fresh_root("large")
    s, _ = ctx.fimio_add(root, large.path)
    ps = None
    if ctx.nix:
        ps, _ = ctx.nix_add(large.path)
    gib = large.bytes / 2**30
    rss = Row(f"peak RSS of add of a {gib:.0f} GiB file", "bytes", s.maxrss_bytes,
              ps.maxrss_bytes if ps else None, "≤ 100 MB", met=s.maxrss_bytes <= RSS_TARGET)
    t = Row(f"add of a {gib:.0f} GiB file, empty store, one run", "time", s.seconds,
            ps.seconds if ps else None, "(no target)")
    return [rss, t]
