"""Benchmark group ``cache``: push and substitute through ``fimio serve`` on loopback, against Nix.

Peer: Nix with a zstd file cache, as in ../shared/anchors.md:
``nix copy --to 'file:///c?compression=zstd' P`` and
``nix-store -r P --option substituters file:///c --option require-sigs false``.

1. push *std* and *big*: ``fimio push http://127.0.0.1:PORT P --key K`` into an empty cache
   served by ``fimio serve`` (a fresh cache and server every run, started untimed) vs
   ``nix copy`` into an empty directory.
2. substitute them back: ``fimio copy --from http://… P`` into a fresh store (signatures
   checked) vs ``nix-store --store D -r P`` into a fresh chroot store ``D`` (initialised
   untimed): both tools fill a store that lacks every byte of the tree.
3. a batched existence check of 10,000 paths against ``fimio serve`` (half present): one
   client call, timed in-process, median of 5 after a warm-up.
4. dedup: re-push *big* after replacing one ~1 MB file (a hard-linked copy of the tree with
   that file rewritten): bytes sent, against the bytes Nix sends for the same re-push.

Every timed command is a whole process, start-up included; ``sync()`` runs untimed before
each. Target stores are created under the scratch parent (common.scratch_parent) and
deleted only after the group, and the first timed run waits out the last large deletion
(see README): no run creates its files where another just freed inodes. Targets: each push/substitute ≤ 0.5× Nix; the query ≤ 0.2 s; the re-push ≤ 2% of the
first push.

Floors (notes under the table, see common.floor_time): each std/big run also times packing
the tree into one zstd archive (``tar | zstd -1 -T0``) and unpacking it into a new directory
(``zstd -d | tar -x``), each followed by ``sync -f``: the least a push and a substitution do
(no hashing, no signatures, no network, no per-object layout).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import trees
from common import (Row, fimio_argv, fimio_env, floor_note, floor_time, log, median, note_deletion, remove_tree,
                    run_cmd, scratch_parent, settle, wait_after_deletion)

NAME = "cache"
HELP = "push/substitute std and big via fimio serve vs nix copy / nix-store -r; 10k-path query; dedup"
TARGET = 0.5
QUERY_TARGET = 0.2
DEDUP_TARGET = 0.02
TOKEN = "bench-write-token-0123456789"
NIX_FEATURES = ["--extra-experimental-features", "nix-command"]


def add_arguments(p) -> None:
    p.add_argument("--runs", type=int, default=3, help="runs per median for std (default 3)")
    p.add_argument("--big-runs", type=int, default=1, help="runs for big (default 1)")
    p.add_argument("--only", action="append", choices=["std", "big", "query", "dedup"],
                   help="run only these parts (repeatable)")


class _Ctx:
    def __init__(self, workdir: str, nix: bool, notes: list[str]):
        self.workdir, self.nix, self.notes = workdir, nix, notes
        self.base = os.path.join(workdir, "cache-bench")
        remove_tree(self.base)
        os.makedirs(self.base)
        self.fimio = fimio_argv()
        self.n = 0
        self.nix_paths: list[str] = []
        self.scratch_dirs: list[str] = []
        key = subprocess.run([*self.fimio, "key", "generate", "bench-1"], capture_output=True, text=True,
                             check=True, env=fimio_env(self.fresh("keyroot"))).stdout
        self.key = os.path.join(self.base, "bench-1.secret")
        with open(self.key, "w") as f:
            f.write(key)
        public = subprocess.run([*self.fimio, "key", "public"], input=key, capture_output=True, text=True,
                                check=True).stdout.strip()
        self.config = os.path.join(self.base, "config.toml")
        with open(self.config, "w") as f:
            f.write(f'trusted-public-keys = ["{public}"]\n')
        self.tokens = os.path.join(self.base, "tokens")
        with open(self.tokens, "w") as f:
            f.write(f"{TOKEN} write\n")

    def fresh(self, label: str) -> str:
        self.n += 1
        d = os.path.join(self.base, f"{label}-{self.n}")
        remove_tree(d)
        os.makedirs(d)
        return d

    def env(self, root: str, **extra) -> dict:
        e = fimio_env(root)
        e["FIMIO_CONFIG"] = self.config
        e.update(extra)
        return e

    def scratch(self, label: str) -> str:
        """A new directory for a store, in a block group of its own; deleted after the group."""
        self.n += 1
        d = os.path.join(scratch_parent(self.workdir), f"cache-{label}-{os.getpid()}-{self.n}")
        self.scratch_dirs.append(d)
        return d

    def new_root(self) -> str:
        root = self.scratch("root")
        subprocess.run([sys.executable, "-c", "import sys; from fimio.store.local import LocalStore; "
                        "LocalStore.open(sys.argv[1]).close()", root], check=True)
        return root


class _Serve:
    def __init__(self, ctx: _Ctx, cache_dir: str):
        self.proc = subprocess.Popen([*ctx.fimio, "serve", "--cache", f"file://{cache_dir}", "--listen",
                                      "127.0.0.1:0", "--tokens", ctx.tokens, "--anonymous-read"],
                                     env=ctx.env(ctx.fresh("serve-root")), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stderr], [], [], 0.2)
            if r:
                line = self.proc.stderr.readline()
                if " on http://" in line:
                    self.url = line.split(" on ", 1)[1].split()[0]
                    return
                if not line:
                    break
        self.stop()
        raise RuntimeError("fimio serve did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


def run(args, workdir: str, nix: bool, notes: list[str]):
    ctx = _Ctx(workdir, nix, notes)
    only = set(args.only or ["std", "big", "query", "dedup"])
    rows, used = [], []
    try:
        # trees first: generating them deletes files, which the wait below then outlasts
        std = trees.make_std(workdir) if "std" in only else None
        big = trees.make_big(workdir, args.seed) if "big" in only or "dedup" in only else None
        wait_after_deletion(workdir)
        if std is not None:
            used.append(std)
            rows += _push_and_substitute(ctx, std, args.runs)[0]
        if big is not None:
            used.append(big)
            big_rows, first = _push_and_substitute(ctx, big, args.big_runs, push_only="big" not in only)
            rows += big_rows if "big" in only else []
            if "dedup" in only:
                rows += _dedup(ctx, big, first)
        if "query" in only:
            rows += _query(ctx)
    finally:
        log("deleting scratch stores and added Nix paths")
        for p in ctx.nix_paths:  # leave the Nix store as we found it
            subprocess.run(["nix-store", "--delete", p], capture_output=True)
        for d in ctx.scratch_dirs:
            remove_tree(d)
        remove_tree(ctx.base)
        note_deletion(workdir)
    return rows, used


def _push_and_substitute(ctx: _Ctx, tree, runs: int, push_only: bool = False):
    log(f"cache {tree.kind}: {runs} run(s) ({tree.describe()})")
    root_a = ctx.new_root()
    fpath = run_cmd([*ctx.fimio, "add", tree.path], env=ctx.env(root_a)).stdout.decode().strip()
    logical = f"/fimio/store/{os.path.basename(fpath)}"
    npath = run_cmd(["nix-store", "--add", tree.path]).stdout.decode().strip() if ctx.nix else None
    push, sub, npush, nsub, fpack, funpack = [], [], [], [], [], []
    first = {"root": root_a, "path": fpath}
    try:
        for i in range(runs):
            cache = ctx.fresh("cache")
            srv = _Serve(ctx, cache)
            try:
                settle()
                s = run_cmd([*ctx.fimio, "push", srv.url, fpath, "--key", ctx.key, "--json"],
                            env=ctx.env(root_a, FIMIO_TOKEN=TOKEN))
                push.append(s.seconds)
                first.update(json.loads(s.stdout), cache=cache)
                if not push_only:
                    root_b = ctx.new_root()
                    settle()
                    sub.append(run_cmd([*ctx.fimio, "copy", "--from", srv.url, logical],
                                       env=ctx.env(root_b)).seconds)
            finally:
                srv.stop()
            if ctx.nix:
                ncache = ctx.fresh("nixcache")
                settle()
                npush.append(run_cmd(["nix", *NIX_FEATURES, "copy", "--to",
                                      f"file://{ncache}?compression=zstd", npath]).seconds)
                first["nix_bytes"] = _du(ncache)
                if not push_only:
                    nstore = ctx.scratch("nix")
                    subprocess.run(["nix-store", "--store", nstore, "--init"], capture_output=True, check=True)
                    settle()
                    nsub.append(run_cmd(["nix-store", "--store", nstore, "-r", npath, "--option", "substituters",
                                         f"file://{ncache}", "--option", "require-sigs", "false"]).seconds)
                first["nix_cache"] = ncache
            if not push_only:
                _floors(ctx, tree, fpack, funpack)
            log(f"  run {i + 1}: push fimio {push[-1]:.2f} s" + (f" nix {npush[-1]:.2f} s" if npush else "")
                + (f"; substitute fimio {sub[-1]:.2f} s" if sub else "") + (f" nix {nsub[-1]:.2f} s" if nsub else "")
                + (f"; floors {fpack[-1].seconds:.2f} s, {funpack[-1].seconds:.2f} s" if fpack else ""))
    finally:
        if npath:
            ctx.nix_paths.append(npath)
    what = f"*{tree.kind}* ({tree.files:,} files, {tree.bytes / 1e6:,.0f} MB)"
    runs_txt = "one run" if runs == 1 else f"median of {runs}"
    rows = []
    for label, mine, peer in ((f"push {what} via fimio serve, {runs_txt}", push, npush),
                              (f"substitute {what} via fimio serve, {runs_txt}", sub, nsub)):
        if not mine:
            continue
        r = Row(label, "time", median(mine), median(peer) if peer else None, f"≤ {TARGET}× nix",
                fimio_samples=mine, peer_samples=peer)
        r.met = None if r.ratio is None else r.ratio <= TARGET
        rows.append(r)
    for what_floor, samples, peer in ((f"push {what}: tar | zstd -1 -T0 into one file, then sync -f", fpack, npush),
                                      (f"substitute {what}: zstd -d | tar -x of that file, then sync -f", funpack,
                                       nsub)):
        if samples:
            ctx.notes.append(floor_note(what_floor, samples, median(peer) if peer else None, TARGET))
    if "bytesSent" in first:
        ctx.notes.append(f"{tree.kind}: fimio sent {first['bytesSent'] / 1e6:,.1f} MB in {first['objectsSent']} "
                         "objects" + (f"; nix's cache holds {first['nix_bytes'] / 1e6:,.1f} MB" if ctx.nix else ""))
    return rows, first


def _floors(ctx: _Ctx, tree, pack: list, unpack: list) -> None:
    """Time the floors (common.floor_time) of a push (pack the tree into one compressed
    archive) and of a substitution (unpack that archive into a new directory)."""
    parent, name = os.path.split(tree.path)
    archive_dir = ctx.scratch("floor-pack")
    pack.append(floor_time('tar -C "$P" -cf - "$N" | zstd -q -1 -T0 > "$D/t.tar.zst" && sync -f "$D"', archive_dir,
                           P=parent, N=name))
    unpack.append(floor_time('zstd -qdc "$A" | tar -x -C "$D" && sync -f "$D"', ctx.scratch("floor-unpack"),
                             A=os.path.join(archive_dir, "t.tar.zst")))


def _du(d: str) -> int:
    return sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(d) for f in fs)


def _dedup(ctx: _Ctx, big, first) -> list[Row]:
    log("dedup: re-push big with one ~1 MB file replaced")
    copy = os.path.join(ctx.fresh("big-edit"), "big")
    subprocess.run(["cp", "-al", big.path, copy], check=True)
    victim = None
    for dirpath, _, files in os.walk(copy):
        for f in sorted(files):
            p = os.path.join(dirpath, f)
            if not os.path.islink(p) and 900_000 <= os.path.getsize(p) <= 1_100_000:
                victim = p
                break
        if victim:
            break
    if victim is None:
        ctx.notes.append("dedup: no ~1 MB file in big; not measured")
        return []
    size = os.path.getsize(victim)
    os.unlink(victim)  # a hard link: replace, never write through to the original tree
    with open(victim, "wb") as f:
        f.write(os.urandom(size))
    root_a = first["root"]
    fpath = run_cmd([*ctx.fimio, "add", copy], env=ctx.env(root_a)).stdout.decode().strip()
    srv = _Serve(ctx, first["cache"])
    try:
        s = run_cmd([*ctx.fimio, "push", srv.url, fpath, "--key", ctx.key, "--json"],
                    env=ctx.env(root_a, FIMIO_TOKEN=TOKEN))
    finally:
        srv.stop()
    sent = json.loads(s.stdout)["bytesSent"]
    ratio = sent / first["bytesSent"]
    nix_sent = None
    if ctx.nix and first.get("nix_cache"):
        npath = run_cmd(["nix-store", "--add", copy]).stdout.decode().strip()
        before = _du(first["nix_cache"])
        run_cmd(["nix", *NIX_FEATURES, "copy", "--to", f"file://{first['nix_cache']}?compression=zstd", npath])
        nix_sent = _du(first["nix_cache"]) - before
        ctx.nix_paths.append(npath)
    ctx.notes.append(f"dedup: replacing one {size / 1e6:.2f} MB file of big re-sent {sent / 1e6:.2f} MB = "
                     f"{ratio:.2%} of the first push ({first['bytesSent'] / 1e6:,.0f} MB)"
                     + (f"; nix re-sent {nix_sent / 1e6:,.1f} MB" if nix_sent is not None else ""))
    r = Row(f"re-push *big* after replacing one {size / 1e6:.1f} MB file: bytes sent", "bytes", sent, nix_sent,
            f"≤ {DEDUP_TARGET:.0%} of first push", met=ratio <= DEDUP_TARGET,
            note=f"{ratio:.2%} of the first push")
    return [r]


def _query(ctx: _Ctx) -> list[Row]:
    log("query: 10,000 paths, one batched request")
    cache = ctx.fresh("querycache")
    os.makedirs(os.path.join(cache, "info"))
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    keys = [f"info/{''.join(alphabet[(i * 7919 >> (5 * k)) % 32] for k in range(32))}.json" for i in range(10_000)]
    for k in keys[::2]:
        with open(os.path.join(cache, k), "w") as f:
            f.write("{}")
    srv = _Serve(ctx, cache)
    try:
        from fimio.store.cache.url import open_backend

        backend = open_backend(srv.url)
        backend.missing(keys)  # warm-up: connection, server detection
        times = []
        for _ in range(5):
            t = time.perf_counter()
            missing = backend.missing(keys)
            times.append(time.perf_counter() - t)
            assert len(missing) == 5_000
    finally:
        srv.stop()
    return [Row("batched existence check of 10,000 paths via fimio serve, median of 5", "time", median(times),
                None, f"≤ {QUERY_TARGET} s", met=median(times) <= QUERY_TARGET, fimio_samples=times)]
