"""The trees every benchmark group works on, built once and cached under the work directory.

* ``std``  -- the running interpreter's standard library (``sysconfig`` 'stdlib'), copied
  without any ``test/``, ``tests/``, ``site-packages/`` or ``__pycache__/`` directory.
* ``big``  -- a generated tree, the same for a given seed on every machine: about 50,000
  files and 1 GB in about 2,800 nested directories, with a realistic mix (see
  :func:`make_big`): many small text files, bytecode-like files, empty/duplicate files, some
  medium files, a few large binaries; compressible and incompressible content;
  executables and symlinks.
* ``large`` -- one 2 GiB file of incompressible bytes (memory-ceiling checks).

Each tree lives at ``<workdir>/trees/<kind>/<name>``; next to it ``<kind>.json`` records its
parameters and counts. A tree whose record is missing or was made with other parameters is
rebuilt (in a temporary directory, renamed into place when complete).

Run ``python bench/trees.py [std|big|large|all] [--workdir DIR]`` to prebuild and describe them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import stat
import sys
import sysconfig
from dataclasses import asdict, dataclass

import blake3

DEFAULT_WORKDIR = "/tmp/fimio-bench"
BIG_SEED = 20240611
_BIG_VERSION = 1  # bump when make_big's recipe changes: cached trees are then rebuilt
_EXCLUDE = {"test", "tests", "site-packages", "__pycache__"}
LARGE_SIZE = 2 << 30
MARKER = "fimio-bench-marker"


@dataclass
class Tree:
    kind: str
    path: str  # the directory (or file) given to the tools
    files: int
    dirs: int
    symlinks: int
    bytes: int
    params: dict

    def describe(self) -> str:
        if self.kind == "large":
            return f"{self.kind}: one file, {self.bytes / 2**30:.2f} GiB at {self.path}"
        return (f"{self.kind}: {self.files:,} files, {self.dirs:,} dirs, {self.symlinks} symlinks, "
                f"{self.bytes / 1e6:,.0f} MB at {self.path}")


def count(path: str) -> tuple[int, int, int, int]:
    """(files, dirs, symlinks, bytes of file contents) of a tree, the marker file excluded."""
    files = dirs = links = size = 0
    st = os.lstat(path)
    if stat.S_ISREG(st.st_mode):
        return 1, 0, 0, st.st_size
    for dirpath, dirnames, filenames in os.walk(path):
        dirs += 1
        for n in dirnames:
            if os.path.islink(os.path.join(dirpath, n)):
                links += 1
        for n in filenames:
            if n == MARKER and dirpath == path:
                continue
            s = os.lstat(os.path.join(dirpath, n))
            if stat.S_ISLNK(s.st_mode):
                links += 1
            else:
                files += 1
                size += s.st_size
    return files, dirs, links, size


def _cached(workdir: str, kind: str, params: dict, build) -> Tree:
    params = json.loads(json.dumps(params))  # the form it takes once stored (tuples -> lists)
    base = os.path.join(workdir, "trees", kind)
    record = base + ".json"
    name = params["name"]
    target = os.path.join(base, name)
    try:
        with open(record) as f:
            data = json.load(f)
        if data["params"] == params and os.path.lexists(target):
            return Tree(**data)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    print(f"building the {kind} tree under {base} ...", file=sys.stderr, flush=True)
    _rmtree(base)
    tmp = base + ".tmp"
    _rmtree(tmp)
    os.makedirs(tmp)
    build(os.path.join(tmp, name))
    os.rename(tmp, base)
    files, dirs, links, size = count(target)
    tree = Tree(kind, target, files, dirs, links, size, params)
    with open(record + ".tmp", "w") as f:
        json.dump(asdict(tree), f, indent=1)
    os.rename(record + ".tmp", record)
    return tree


def _rmtree(path: str) -> None:
    if os.path.lexists(path):
        for dirpath, dirnames, _ in os.walk(path):
            for d in dirnames:
                p = os.path.join(dirpath, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o755)
        shutil.rmtree(path)


# ---- std ----------------------------------------------------------------------------------


def make_std(workdir: str = DEFAULT_WORKDIR, source: str | None = None) -> Tree:
    """The interpreter's stdlib without test/, tests/, site-packages/, __pycache__/."""
    source = os.path.realpath(source or sysconfig.get_path("stdlib"))
    params = {"name": "std", "source": source, "exclude": sorted(_EXCLUDE)}

    def build(dest: str) -> None:
        shutil.copytree(source, dest, symlinks=True, ignore=lambda d, names: [n for n in names if n in _EXCLUDE])

    return _cached(workdir, "std", params, build)


# ---- big ----------------------------------------------------------------------------------

_WORDS = (
    "def class return import from self value data node tree path store hash build cache "
    "config parse token buffer stream reader writer index item key list dict none true false "
    "yield async await lambda with open close error raise except finally while for in if else "
    "elif not and or is pass break continue global assert print format result output input "
    "size length offset count total range map filter sorted append extend update get set "
    "name type module package version record entry block chunk digest signature manifest"
).split()


def _corpus(rng: random.Random, size: int) -> bytes:
    """Python-looking text: indented lines of identifiers, calls, literals and comments."""
    out: list[str] = []
    n = 0
    while n < size:
        indent = "    " * rng.choice((0, 1, 1, 2, 2, 2, 3))
        r = rng.random()
        w = rng.choices(_WORDS, k=rng.randint(2, 8))
        if r < 0.15:
            line = f"{indent}# {' '.join(w)}"
        elif r < 0.3:
            line = f"{indent}def {w[0]}_{w[1]}({', '.join(w[2:])}):"
        elif r < 0.6:
            line = f"{indent}{w[0]} = {w[1]}.{w[-1]}({rng.randint(0, 9999)}, '{w[0]}')"
        else:
            line = f"{indent}{' '.join(w)}"
        out.append(line)
        n += len(line) + 1
    return ("\n".join(out) + "\n").encode()


def _xof(key: str, n: int) -> bytes:
    """Incompressible, deterministic bytes."""
    return blake3.blake3(key.encode()).digest(length=n) if n else b""


def _mixed(key: str, n: int, corpus: bytes) -> bytes:
    """Half structured, half random, interleaved in 4 KiB pieces (like .so or .pyc files)."""
    rnd = _xof(key, n)
    parts = []
    for off in range(0, n, 8192):
        parts.append(rnd[off : off + 4096])
        start = (off * 7919) % (len(corpus) - 4096)
        parts.append(corpus[start : start + 4096])
    return b"".join(parts)[:n]


def _log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


# (category, count, min size, max size). Mean sizes: source ~7.5 KB, bytecode ~6.5 KB,
# medium ~305 KB, large ~6.7 MB: about 50k files, 1 GB.
_BIG_MIX = [
    ("source", 33000, 200, 40_000),
    ("bytecode", 12000, 300, 30_000),
    ("tiny", 3000, 0, 64),
    ("medium", 1900, 40_000, 1_000_000),
    ("large", 12, 2_000_000, 16_000_000),
]
_BIG_DIRS = 2800
_BIG_SYMLINKS = 60


def make_big(workdir: str = DEFAULT_WORKDIR, seed: int = BIG_SEED) -> Tree:
    """The generated tree, identical for a given seed."""
    params = {"name": "big", "seed": seed, "version": _BIG_VERSION, "mix": _BIG_MIX, "dirs": _BIG_DIRS}

    def build(dest: str) -> None:
        _build_big(dest, seed)

    return _cached(workdir, "big", params, build)


def _build_big(dest: str, seed: int) -> None:
    rng = random.Random(seed)
    corpus = _corpus(rng, 8 << 20)
    # directories: grow a tree by attaching each new directory to a random shallow-enough one
    dirs = [""]
    depth = {"": 0}
    used: dict[str, set[str]] = {"": set()}
    while len(dirs) < _BIG_DIRS:
        parent = rng.choice(dirs)
        if depth[parent] >= 6:
            continue
        name = _unique(rng, used[parent], "")
        d = f"{parent}/{name}" if parent else name
        dirs.append(d)
        depth[d] = depth[parent] + 1
        used[d] = set()
    for d in dirs:
        os.makedirs(os.path.join(dest, d), exist_ok=True)
    # a few contents shared by many files (empty __init__.py, license text, py.typed...)
    shared_tiny = [b"", b"", b"\n", b"# package\n", b"partial\n"]
    license_text = corpus[:1071]
    index = 0
    files: list[str] = []
    for category, n, lo, hi in _BIG_MIX:
        for _ in range(n):
            index += 1
            d = rng.choice(dirs)
            key = f"{seed}/{index}"
            executable = False
            if category == "source":
                size = _log_uniform(rng, lo, hi)
                ext = rng.choice((".py", ".py", ".py", ".txt", ".json", ".h", ".md", ".cfg"))
                if rng.random() < 0.02:
                    data = license_text  # duplicated across the tree
                else:
                    start = rng.randrange(0, len(corpus) - size)
                    header = f"# {d}/{index}\n".encode()
                    data = header + corpus[start : start + size - len(header)]
                executable = rng.random() < 0.03
            elif category == "bytecode":
                size = _log_uniform(rng, lo, hi)
                ext = ".pyc"
                data = _mixed(key, size, corpus)
            elif category == "tiny":
                ext = rng.choice(("__init__.py", ".typed", ".txt"))
                data = rng.choice(shared_tiny) if rng.random() < 0.7 else f"{index}\n".encode()
            elif category == "medium":
                size = _log_uniform(rng, lo, hi)
                r = rng.random()
                if r < 0.5:
                    ext = rng.choice((".py", ".csv", ".html", ".json"))
                    start = rng.randrange(0, len(corpus) - size)
                    data = f"{index}\n".encode() + corpus[start : start + size]
                elif r < 0.75:
                    ext = rng.choice((".png", ".gz", ".whl", ".npz"))
                    data = _xof(key, size)
                else:
                    ext = ".so"
                    data = _mixed(key, size, corpus)
                    executable = True
            else:  # large binaries
                size = _log_uniform(rng, lo, hi)
                if rng.random() < 0.5:
                    ext = ".so"
                    data = _mixed(key, size, corpus)
                    executable = True
                else:
                    ext = ".bin"
                    data = _xof(key, size)
            name = _unique(rng, used[d], ext if ext != "__init__.py" else "", fixed=ext == "__init__.py")
            p = os.path.join(dest, d, name)
            with open(p, "wb") as f:
                f.write(data)
            if executable:
                os.chmod(p, 0o755)
            files.append(f"{d}/{name}" if d else name)
    for _ in range(_BIG_SYMLINKS):
        d = rng.choice(dirs)
        target = rng.choice(files)
        rel = os.path.relpath(target, d or ".")
        name = _unique(rng, used[d], ".link")
        os.symlink(rel, os.path.join(dest, d, name))


def _unique(rng: random.Random, used: set[str], ext: str, fixed: bool = False) -> str:
    if fixed and "__init__.py" not in used:
        used.add("__init__.py")
        return "__init__.py"
    while True:
        name = "_".join(rng.choices(_WORDS, k=rng.randint(1, 3))) + ext
        if name not in used:
            used.add(name)
            return name


# ---- large --------------------------------------------------------------------------------


def make_large(workdir: str = DEFAULT_WORKDIR, size: int = LARGE_SIZE) -> Tree:
    """One file of ``size`` incompressible bytes."""
    params = {"name": f"large-{size}.bin", "size": size, "version": 1}

    def build(dest: str) -> None:
        h = blake3.blake3(b"fimio-bench-large")
        step = 64 << 20
        with open(dest, "wb") as f:
            for off in range(0, size, step):
                f.write(h.digest(length=min(step, size - off), seek=off))

    return _cached(workdir, "large", params, build)


MAKERS = {"std": make_std, "big": make_big, "large": make_large}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Build (or show) the cached benchmark trees.")
    ap.add_argument("which", nargs="*", help="all (default), std, big or large")
    ap.add_argument("--workdir", default=DEFAULT_WORKDIR)
    args = ap.parse_args(argv)
    kinds = list(MAKERS) if not args.which or "all" in args.which else args.which
    for k in kinds:
        if k not in MAKERS:
            ap.error(f"unknown tree {k!r}")
    for k in kinds:
        print(MAKERS[k](args.workdir).describe())


if __name__ == "__main__":
    main()
