"""repro: the cost of ``realise --check`` and of ``fimio diff`` on big outputs.

1. A derivation doing about a second of work (hash 300 MB of zeros, write 500 files) is
   built from nothing (a fresh salt every run), then checked with ``realise --check``
   (one more build, compared bit for bit). Target: the check costs at most 1.2x the plain
   build. Peer: Nix, ``nix-build`` then ``nix-build --check`` of the same builder script.
2. Two 50,000-file outputs that differ in 10 files (changed, added, removed, mode, type)
   are compared with ``fimio diff A B`` (whole process, start-up included). Target: 2 s.
   Peer: ``diff -r --brief`` over the two materialised trees (what a user without a
   Merkle index would run).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from common import Row, fimio_argv, fimio_env, log, median, remove_tree, run_cmd, settle

NAME = "repro"
HELP = "realise --check vs a plain build, and fimio diff of two 50k-file outputs"
CHECK_TARGET = 1.2
DIFF_TARGET = 2.0
SCRIPT = ("mkdir $out && for i in $(seq 1 500); do echo $i > $out/f$i; done && "
          "head -c 300000000 /dev/zero | sha256sum > $out/sum && echo {salt} > $out/salt")
NIX_SANDBOX = ["--option", "sandbox", "true", "--option", "sandbox-paths", "/bin/sh=/bin/sh /lib /lib64 /usr"]


def add_arguments(p) -> None:
    p.add_argument("--runs", type=int, default=3, help="runs per median (default 3)")
    p.add_argument("--files", type=int, default=50_000, help="files per output in the diff row")


def _fimio_drv(directory: str, salt: str) -> str:
    import json

    path = os.path.join(directory, f"work-{salt}.toml")
    with open(path, "w") as f:
        f.write(f'name = "work"\nbuilder = "/bin/sh"\nargs = ["-c", {json.dumps(SCRIPT.format(salt=salt))}]\n'
                '[env]\nPATH = "/usr/bin:/bin"\n')
    return path


def _nix_expr(directory: str, salt: str) -> str:
    path = os.path.join(directory, f"work-{salt}.nix")
    script = SCRIPT.format(salt=salt).replace("\\", "\\\\").replace('"', '\\"').replace("${", "\\${")
    with open(path, "w") as f:
        f.write(f'derivation {{ name = "work"; system = builtins.currentSystem; builder = "/bin/sh"; '
                f'PATH = "/usr/bin:/bin"; args = [ "-c" "{script}" ]; }}\n')
    return path


def _check_rows(args, base: str, nix: bool, notes: list[str]) -> list[Row]:
    build, check, nbuild, ncheck = [], [], [], []
    for r in range(args.runs):
        salt = f"{time.time_ns()}-{r}"
        root = os.path.join(base, f"root-{r}")
        drv = _fimio_drv(base, salt)
        settle()
        s = run_cmd(fimio_argv() + ["realise", "--no-out-link", drv], env=fimio_env(root))
        build.append(s.seconds)
        settle()
        s = run_cmd(fimio_argv() + ["realise", "--no-out-link", "--check", drv], env=fimio_env(root))
        check.append(s.seconds)
        log(f"fimio: build {build[-1]:.2f} s, --check {check[-1]:.2f} s")
        if nix:
            expr = _nix_expr(base, salt)
            settle()
            s = run_cmd(["nix-build", expr, "--no-out-link", *NIX_SANDBOX])
            nbuild.append(s.seconds)
            settle()
            s = run_cmd(["nix-build", expr, "--no-out-link", "--check", *NIX_SANDBOX])
            ncheck.append(s.seconds)
            log(f"nix: build {nbuild[-1]:.2f} s, --check {ncheck[-1]:.2f} s")
            subprocess.run(["nix-store", "--delete", s.stdout.decode().strip()], capture_output=True)
    fb, fc = median(build), median(check)
    ratio = fc / fb
    rows = [
        Row("plain build (~1 s of work, 500 files)", "time", fb, median(nbuild) if nbuild else None,
            fimio_samples=build, peer_samples=nbuild),
        Row("realise --check of that valid output", "time", fc, median(ncheck) if ncheck else None,
            target=f"≤ {CHECK_TARGET}× the plain build (is {ratio:.2f}×)", met=ratio <= CHECK_TARGET,
            fimio_samples=check, peer_samples=ncheck),
    ]
    notes.append("realise --check: the peer column is nix-build / nix-build --check of the same script")
    return rows


def _make_tree(root: str, files: int, per_dir: int = 100) -> None:
    for i in range(files):
        d = os.path.join(root, f"d{i // per_dir:04d}")
        if i % per_dir == 0:
            os.makedirs(d)
        with open(os.path.join(d, f"f{i:06d}.txt"), "w") as f:
            f.write(f"file {i}\n" * (1 + i % 7))


def _ten_changes(b: str) -> None:
    def p(*parts):
        return os.path.join(b, *parts)

    for i in (0, 1234, 2345):
        with open(p(f"d{i // 100:04d}", f"f{i:06d}.txt"), "a") as f:
            f.write("changed\n")
    os.unlink(p("d0001", "f000100.txt"))
    with open(p("d0002", "new.txt"), "w") as f:
        f.write("new\n")
    os.chmod(p("d0003", "f000300.txt"), 0o755)
    os.unlink(p("d0004", "f000400.txt"))
    os.symlink("f000401.txt", p("d0004", "f000400.txt"))
    os.makedirs(p("d0005", "extra"))
    with open(p("d0005", "extra", "x"), "w") as f:
        f.write("x\n")
    shutil.rmtree(p("d0006"))
    with open(p("d0007", "f000700.txt"), "wb") as f:
        f.write(b"\0binary\0")


def _diff_rows(args, base: str, notes: list[str]) -> list[Row]:
    a, b = os.path.join(base, "tree-a"), os.path.join(base, "tree-b")
    log(f"diff: generating two {args.files}-file trees")
    _make_tree(a, args.files)
    shutil.copytree(a, b, symlinks=True)
    _ten_changes(b)
    root = os.path.join(base, "root-diff")
    env = fimio_env(root)
    pa = run_cmd(fimio_argv() + ["add", a], env=env).stdout.decode().strip()
    pb = run_cmd(fimio_argv() + ["add", b], env=env).stdout.decode().strip()
    times, peer = [], []
    for _ in range(args.runs):
        s = run_cmd(fimio_argv() + ["diff", pa, pb], env=env)
        assert b"10 paths" in s.stdout, s.stdout[:500]
        times.append(s.seconds)
        s = run_cmd(["diff", "-r", "--brief", "--no-dereference", pa, pb], check=False)
        peer.append(s.seconds)
    log(f"fimio diff: {median(times):.3f} s; diff -r --brief: {median(peer):.3f} s")
    notes.append("fimio diff: the peer column is GNU 'diff -r --brief' over the two materialised store paths")
    t = median(times)
    return [Row(f"fimio diff of two {args.files:,}-file outputs differing in 10", "time", t, median(peer),
                target=f"≤ {DIFF_TARGET:.0f} s", met=t <= DIFF_TARGET, fimio_samples=times, peer_samples=peer)]


def run(args, workdir: str, nix: bool, notes: list[str]):
    base = os.path.join(workdir, "repro")
    remove_tree(base)
    os.makedirs(base)
    try:
        rows = _check_rows(args, base, nix, notes)
        rows += _diff_rows(args, base, notes)
    finally:
        remove_tree(base)
    return rows, []
