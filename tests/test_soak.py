"""Soaks: many processes on one store, many clients on one ``fimio serve``, for a bounded time.

* Store soak: ``realise`` (with out-links, i.e. GC roots, and without), ``add``, ``push`` to
  a file:// cache, ``gc`` and ``verify`` run concurrently on one root for
  ``FIMIO_SOAK_SECONDS`` (20 s; the slow variant 120 s). Every process must finish within
  its timeout (no deadlock) and succeed; afterwards ``verify --check-contents`` is clean,
  every rooted output (and its closure) is valid with the digest the realise reported, and
  the cache shows no incomplete path.
* Server soak: 64 concurrent clients (asyncio, loopback) mix GET/HEAD of existing and
  absent objects, ``POST /_api/v1/missing``, authenticated PUTs of new, existing and
  corrupt objects, and real ``fimio push`` processes, for ``FIMIO_SERVE_SOAK_SECONDS``
  (15 s). No 5xx, every answer right (GETs checked against digests, missing-queries against
  the truth), every object in the cache matches its address afterwards, and the server's
  peak RSS stays bounded.
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import random
import subprocess
import threading
import time
from collections import Counter

import blake3
import pytest

import faults
from cachefixtures import WRITE_TOKEN, Serve, make_keys, write_config
from conftest import fimio_env, fimio_executable

SOAK = float(os.environ.get("FIMIO_SOAK_SECONDS", "20"))
SERVE_SOAK = float(os.environ.get("FIMIO_SERVE_SOAK_SECONDS", "15"))
TIMEOUT = 180  # any single command taking longer is a deadlock


def small_graph(directory: pathlib.Path, salt: str) -> pathlib.Path:
    """8 derivations in 4 layers of 2, a multi-file output, a two-output derivation, a top."""
    directory.mkdir(parents=True, exist_ok=True)
    for layer in range(4):
        for j in range(2):
            n = f"s{layer}{j}"
            ins = {f"i{k}": f"s{layer - 1}{k}" for k in range(2)} if layer else {}
            deps = " ".join(f"${k}" for k in ins)
            if j == 0:
                faults.write_drv(directory, n, f"mkdir -p $out/d; for i in 1 2 3 4 5 6; do echo {n} {salt} $i "
                                               f"{deps} > $out/d/f$i; done", ins)
            else:
                faults.write_drv(directory, n, f"mkdir $out $dev; echo {n} {salt} {deps} > $out/x; "
                                               "echo $out > $dev/y", ins, ["out", "dev"])
    faults.write_drv(directory, "top", f"echo {salt} $a $b > $out", {"a": "s30", "b": "s31"})
    return directory / "top.toml"


class Soak:
    def __init__(self, tmp_path: pathlib.Path, seconds: float):
        self.tmp = tmp_path
        self.root = tmp_path / "root"
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        sk, pk = make_keys("soak-1")
        (tmp_path / "sk").write_text(str(sk) + "\n")
        self.config = write_config(tmp_path / "config.toml", trusted=[pk])
        self.cache = tmp_path / "cache"
        self.links = tmp_path / "links"
        self.links.mkdir()
        self.graphs = [small_graph(tmp_path / f"g{i}", f"salt{i}") for i in range(6)]
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self.rooted: dict[str, str] = {}  # out-link -> output base it must keep valid
        self.reported: dict[str, str] = {}  # output base -> digest a realise reported

    def run(self, name: str, args, timeout=TIMEOUT) -> subprocess.CompletedProcess | None:
        env = fimio_env(self.root, {"FIMIO_CONFIG": self.config})
        try:
            p = subprocess.run([fimio_executable(), *map(str, args)], env=env, capture_output=True, text=True,
                               timeout=timeout, cwd=self.tmp)
        except subprocess.TimeoutExpired:
            with self.lock:
                self.failures.append(f"{name}: {args} did not finish within {timeout} s (deadlock?)")
            return None
        with self.lock:
            self.counts[name] += 1
            if p.returncode != 0:
                self.failures.append(f"{name}: {args} exited {p.returncode}: {p.stderr.strip()[-500:]}")
        return p

    # ---- workers ------------------------------------------------------------------------

    def realise(self, n: int, rnd: random.Random):
        i = 0
        while time.monotonic() < self.deadline:
            g = rnd.choice(self.graphs)
            i += 1
            if rnd.random() < 0.5:
                link = self.links / f"w{n}-{i}"
                p = self.run("realise", ["realise", "--json", "-o", link, g])
            else:
                link = None
                p = self.run("realise", ["realise", "--json", "--no-out-link", g])
            if p is None or p.returncode != 0:
                continue
            data = json.loads(p.stdout)
            base = data["targets"][0]["outputs"]["out"]["path"].rsplit("/", 1)[1]
            if link is not None:
                with self.lock:
                    self.rooted[str(link)] = base

    def add(self, n: int, rnd: random.Random):
        i = 0
        while time.monotonic() < self.deadline:
            i += 1
            d = self.tmp / f"src-{n}-{i}"
            (d / "sub").mkdir(parents=True)
            for k in range(rnd.randrange(1, 30)):
                (d / "sub" / f"f{k}").write_bytes(rnd.randbytes(rnd.randrange(0, 50_000)))
            self.run("add", ["add", d])

    def push(self, n: int, rnd: random.Random):
        while time.monotonic() < self.deadline:
            with self.lock:
                links = list(self.rooted)
            if not links:
                time.sleep(0.2)
                continue
            link = rnd.choice(links)
            self.run("push", ["push", f"file://{self.cache}", link, "--key", self.tmp / "sk"])

    def gc(self, n: int, rnd: random.Random):
        while time.monotonic() < self.deadline:
            self.run("gc", ["gc"])
            time.sleep(rnd.uniform(0.2, 1.0))

    def verify(self, n: int, rnd: random.Random):
        while time.monotonic() < self.deadline:
            self.run("verify", ["verify"])
            time.sleep(rnd.uniform(0.5, 1.5))


def run_store_soak(tmp_path, seconds: float) -> Soak:
    soak = Soak(tmp_path, seconds)
    soak.run("setup", ["verify"])
    workers = [("realise", 0), ("realise", 1), ("add", 0), ("push", 0), ("gc", 0), ("verify", 0)]
    threads = [threading.Thread(target=getattr(soak, kind), args=(n, random.Random(f"{faults.SEED}:{kind}:{n}")))
               for kind, n in workers]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + TIMEOUT + 30)
    assert not any(t.is_alive() for t in threads), "a worker is stuck"
    elapsed = time.monotonic() - start
    assert not soak.failures, "\n".join(soak.failures[:10])
    # afterwards: clean, nothing rooted lost, the cache whole
    faults.assert_verify_clean(soak.root, "after the soak", soak.config)
    s = faults.open_store(soak.root)
    try:
        from fimio.store.paths import StorePath

        for link, base in soak.rooted.items():
            assert os.readlink(link).endswith(base), link
            info = s.query(StorePath.parse(base))
            assert info is not None, f"{base} (rooted by {link}) was lost"
            s.closure([info.path])  # raises if anything of its closure is gone
    finally:
        s.close()
    assert faults.cache_problems(soak.cache, deep=True) == []
    print(f"store soak {elapsed:.1f}s: {dict(soak.counts)}; {len(soak.rooted)} rooted outputs kept")
    assert soak.counts["realise"] >= 4 and soak.counts["gc"] >= 3, dict(soak.counts)
    return soak


def test_store_soak(tmp_path):
    run_store_soak(tmp_path, SOAK)


@pytest.mark.slow
def test_store_soak_long(tmp_path):
    run_store_soak(tmp_path, float(os.environ.get("FIMIO_SOAK_LONG_SECONDS", "120")))


# ---- server soak -------------------------------------------------------------------------


def rss_kb(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a process in KiB, from /proc."""
    cur = peak = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                cur = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                peak = int(line.split()[1])
    return cur, peak


def chunk_object(data: bytes) -> tuple[str, bytes]:
    from fimio.store.cache import packing
    from fimio.store.cache.layout import object_key

    return object_key("chunks", blake3.blake3(data).digest()), packing.compress(data, 3)


def check_object(key: str, body: bytes) -> None:
    """A content-addressed object's bytes match its address."""
    import zstandard

    from fimio.store.cache import packing

    raw = packing.decompress(body, zstandard.frame_content_size(body), key)
    digest = bytes.fromhex(key.rsplit("/", 1)[1][:64])
    if key.startswith("packs/"):
        assert packing.pack_id(packing.parse_pack(raw, key)) == digest, key
    else:
        packing.check_digest(raw, digest, key)


async def _clients(url: str, keys: list[str], seconds: float, clients: int, stats: Counter, errors: list):
    import aiohttp

    deadline = time.monotonic() + seconds
    present = set(keys)
    uploaded: list[str] = []
    auth = {"Authorization": f"Bearer {WRITE_TOKEN}"}

    async def one(n: int, session):
        rnd = random.Random(n)
        while time.monotonic() < deadline:
            r = rnd.random()
            try:
                if r < 0.40:
                    key = rnd.choice(keys + uploaded[-50:])
                    async with session.get(f"{url}/{key}") as resp:
                        body = await resp.read()
                        stats[f"GET {resp.status}"] += 1
                        if resp.status != 200:
                            errors.append(f"GET {key}: {resp.status}")
                        elif key.startswith(("chunks/", "packs/", "trees/")):
                            check_object(key, body)
                elif r < 0.50:
                    key = f"chunks/00/{os.urandom(32).hex()}.zst"
                    async with session.head(f"{url}/{key}") as resp:
                        stats[f"HEAD {resp.status}"] += 1
                        if resp.status != 404:
                            errors.append(f"HEAD absent {key}: {resp.status}")
                elif r < 0.70:
                    ask = rnd.sample(keys, min(20, len(keys))) + [f"chunks/ff/{os.urandom(32).hex()}.zst"
                                                                  for _ in range(5)]
                    async with session.post(f"{url}/_api/v1/missing", json={"keys": ask}) as resp:
                        stats[f"POST {resp.status}"] += 1
                        answer = await resp.json()
                        wrong = set(answer["missing"]) ^ {k for k in ask if k not in present}
                        if resp.status != 200 or wrong:
                            errors.append(f"missing query: {resp.status} wrong={sorted(wrong)[:3]}")
                elif r < 0.90:
                    key, body = chunk_object(rnd.randbytes(rnd.randrange(1, 300_000)) + os.urandom(8))
                    async with session.put(f"{url}/{key}", data=body, headers=auth) as resp:
                        stats[f"PUT {resp.status}"] += 1
                        if resp.status not in (200, 201):
                            errors.append(f"PUT {key}: {resp.status}")
                        else:
                            uploaded.append(key)
                elif r < 0.95:
                    key = rnd.choice(keys)  # an existing object again: 200, unchanged
                    if key.startswith(("chunks/", "packs/", "trees/")):
                        body = faults_cache_bytes[key]
                        async with session.put(f"{url}/{key}", data=body, headers=auth) as resp:
                            stats[f"PUT-again {resp.status}"] += 1
                            if resp.status != 200:
                                errors.append(f"PUT again {key}: {resp.status}")
                else:
                    key, body = chunk_object(os.urandom(1000))
                    bad = f"chunks/{key.split('/')[1]}/{os.urandom(32).hex()}.zst"  # wrong address
                    async with session.put(f"{url}/{bad}", data=body, headers=auth) as resp:
                        stats[f"PUT-corrupt {resp.status}"] += 1
                        if resp.status != 400:
                            errors.append(f"corrupt PUT answered {resp.status}")
            except Exception as e:  # noqa: BLE001 -- a failure of the server is a finding
                errors.append(f"client {n}: {e!r}")

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(one(n, session) for n in range(clients)))
    return uploaded


faults_cache_bytes: dict[str, bytes] = {}


def test_serve_soak(tmp_path):
    # a cache with real content: the graph and a tree, pushed by fimio itself
    sk, pk = make_keys("soak-2")
    (tmp_path / "sk").write_text(str(sk) + "\n")
    cache = tmp_path / "cache"
    src = tmp_path / "src"
    graph = small_graph(tmp_path / "g", "serve")
    tree = faults.make_tree(tmp_path / "tree", seed=5, files=400, large=2, large_size=3_000_000)
    config = write_config(tmp_path / "config.toml", trusted=[pk])
    faults.fim(["realise", "--no-out-link", graph], src, config, check=0)
    tree_path = faults.fim(["add", tree], src, config, check=0).stdout.strip()
    faults.fim(["push", f"file://{cache}", graph, tree_path, "--key", tmp_path / "sk"], src, config, check=0)
    keys = [str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and not p.name.startswith(".")
            and ".tmp" not in p.parts]
    faults_cache_bytes.clear()
    faults_cache_bytes.update({k: (cache / k).read_bytes() for k in keys})

    server = Serve(f"file://{cache}", tmp_path, tokens={WRITE_TOKEN: "write"}, anonymous_read=True)
    peak_seen = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak_seen[0] = max(peak_seen[0], rss_kb(server.proc.pid)[0])
            except FileNotFoundError:
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample)
    sampler.start()
    # real pushes alongside: fresh trees through the same server
    push_cfg = write_config(tmp_path / "push.toml", trusted=[pk], tokens={server.url: WRITE_TOKEN})
    pushes: list[subprocess.Popen] = []
    push_paths = []
    for i in range(3):
        t = faults.make_tree(tmp_path / f"pt{i}", seed=100 + i, files=200, large=2, large_size=1_500_000)
        push_paths.append(faults.fim(["add", t], src, push_cfg, check=0).stdout.strip())
    stats: Counter = Counter()
    errors: list[str] = []
    try:
        start = time.monotonic()
        for p in push_paths:
            pushes.append(subprocess.Popen([fimio_executable(), "push", server.url, p, "--key", tmp_path / "sk"],
                                           env=fimio_env(src, {"FIMIO_CONFIG": push_cfg}),
                                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        uploaded = asyncio.run(_clients(server.url, keys, SERVE_SOAK, 64, stats, errors))
        for p in pushes:
            _, err = p.communicate(timeout=TIMEOUT)
            assert p.returncode == 0, err
        elapsed = time.monotonic() - start
        cur, peak = rss_kb(server.proc.pid)
    finally:
        stop.set()
        sampler.join()
        code = server.stop()
    assert code == 0
    assert not errors, errors[:10]
    assert not [k for k in stats if k.split()[-1].startswith("5")], stats
    # every object in the cache matches its address; every pushed path is whole
    for p in cache.rglob("*.zst"):
        rel = str(p.relative_to(cache))
        if rel.startswith(("chunks/", "packs/", "trees/")):
            check_object(rel, p.read_bytes())
    assert faults.cache_problems(cache, deep=True) == []
    for p in push_paths:
        assert f"{os.path.basename(p)[:32]}.json" in faults.infos_in(cache)
    total = sum(stats.values())
    print(f"serve soak {elapsed:.1f}s, 64 clients: {total} requests ({total / elapsed:.0f}/s) {dict(stats)}; "
          f"{len(uploaded)} uploads; 3 pushes; server RSS now {cur // 1024} MiB, peak {peak // 1024} MiB")
    assert peak < 512 * 1024, f"server peak RSS {peak // 1024} MiB"
