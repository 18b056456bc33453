"""realise: building a 201-derivation graph, and a no-op realise, against Nix.

The graph is the one of ../shared/anchors.md: 20 layers of 10 trivial derivations, each
depending on the whole layer below, plus one on top (each builder: /bin/sh -c "echo N > $out").
Both tools build it from nothing with 2 parallel jobs in their sandboxes; a salt that
changes every run keeps either side from reusing an earlier run's outputs.
The no-op rows time a realise of an already-valid target: a `.drv` store path for both
tools, and (fimio only has it) a derivation file.
"""

from __future__ import annotations

import os
import subprocess
import time

from common import Row, fimio_argv, fimio_env, log, median, remove_tree, run_cmd

NAME = "realise"
HELP = "build the 201-derivation graph and time no-op realises, fimio vs nix"
LAYERS, WIDTH = 20, 10
NIX_SANDBOX = ["--option", "sandbox", "true", "--option", "sandbox-paths", "/bin/sh=/bin/sh /lib /lib64 /usr"]


def add_arguments(p) -> None:
    p.add_argument("--runs", type=int, default=3, help="full-graph builds per tool (median)")
    p.add_argument("--noop-runs", type=int, default=20, help="no-op realises per tool (median)")
    p.add_argument("--jobs", type=int, default=2, help="parallel builds for both tools")


def write_fimio_graph(directory: str, salt: str) -> str:
    """Write the graph as fimio TOML files; return the top file."""
    os.makedirs(directory, exist_ok=True)

    def write(name: str, number: int, deps: list[str]) -> None:
        lines = [f'name = "{name}"', 'builder = "/bin/sh"', f'args = ["-c", "echo {number}-{salt} > $out"]']
        if deps:
            lines.append("[inputs]")
            lines += [f'd{k} = {{ drv = "{d}.toml" }}' for k, d in enumerate(deps)]
        with open(os.path.join(directory, f"{name}.toml"), "w") as f:
            f.write("\n".join(lines) + "\n")

    prev: list[str] = []
    for layer in range(LAYERS):
        names = [f"n{layer * 1000 + i}" for i in range(WIDTH)]
        for i, name in enumerate(names):
            write(name, layer * 1000 + i, prev)
        prev = names
    write("n99999", 99999, prev)
    return os.path.join(directory, "n99999.toml")


def write_nix_graph(path: str, salt: str) -> str:
    expr = f"""let mk = i: deps: derivation {{ name = "n${{toString i}}"; system = builtins.currentSystem;
      builder = "/bin/sh"; args = [ "-c" "echo ${{toString i}}-{salt} > $out" ]; inherit deps; }};
    layer = n: prev: builtins.genList (i: mk (n*1000+i) prev) {WIDTH};
    l = builtins.foldl' (acc: n: layer n acc) [] (builtins.genList (x: x) {LAYERS});
in mk 99999 l
"""
    with open(path, "w") as f:
        f.write(expr)
    return path


def run(args, workdir: str, nix: bool, notes: list[str]):
    base = os.path.join(workdir, "realise")
    remove_tree(base)
    os.makedirs(base)
    fimio_times, nix_times = [], []
    for r in range(args.runs):
        salt = f"{time.time_ns()}-{r}"
        root = os.path.join(base, f"root-{r}")
        top = write_fimio_graph(os.path.join(base, f"graph-{r}"), salt)
        s = run_cmd(fimio_argv() + ["realise", "-j", str(args.jobs), "--no-out-link", top], env=fimio_env(root))
        fimio_times.append(s.seconds)
        log(f"fimio realise 201 derivations: {s.seconds:.2f} s")
        if nix:
            expr = write_nix_graph(os.path.join(base, f"g-{r}.nix"), salt)
            s = run_cmd(["nix-build", expr, "--no-out-link", "--max-jobs", str(args.jobs), *NIX_SANDBOX])
            nix_times.append(s.seconds)
            log(f"nix-build 201 derivations: {s.seconds:.2f} s")
    rows = [Row("build 201-derivation graph, -j 2, sandboxed", "time", median(fimio_times),
                median(nix_times) if nix_times else None, "≤ 0.33× nix",
                fimio_samples=fimio_times, peer_samples=nix_times)]
    rows += _noop(args, base, nix)
    for row in rows:
        if row.ratio is not None and row.target.startswith("≤"):
            row.met = row.ratio <= float(row.target.split()[1].rstrip("×"))
    return rows, []


def _noop(args, base: str, nix: bool) -> list[Row]:
    root = os.path.join(base, "root-0")
    top = os.path.join(base, "graph-0", "n99999.toml")
    env = fimio_env(root)
    drv = run_cmd(fimio_argv() + ["instantiate", top], env=env).stdout.decode().strip()
    run_cmd(fimio_argv() + ["realise", "--no-out-link", top], env=env)
    fimio_drv = _repeat(fimio_argv() + ["realise", "--no-out-link", drv], env, args.noop_runs)
    fimio_toml = _repeat(fimio_argv() + ["realise", "--no-out-link", top], env, args.noop_runs)
    nix_drv = None
    if nix:
        expr = os.path.join(base, "g-0.nix")
        nix_path = subprocess.run(["nix-instantiate", expr], capture_output=True, text=True, check=True).stdout.strip()
        run_cmd(["nix-store", "--realise", nix_path, *NIX_SANDBOX])
        nix_drv = _repeat(["nix-store", "--realise", nix_path], None, args.noop_runs)
    return [
        Row("no-op realise of a valid .drv", "time", median(fimio_drv), median(nix_drv) if nix_drv else None,
            "≤ 2× nix", fimio_samples=fimio_drv, peer_samples=nix_drv or []),
        Row("no-op realise of a valid TOML target (peer: its .drv)", "time", median(fimio_toml),
            median(nix_drv) if nix_drv else None, "≤ 2.5× nix", fimio_samples=fimio_toml, peer_samples=nix_drv or []),
    ]


def _repeat(argv, env, n) -> list[float]:
    run_cmd(argv, env=env)  # warm
    return [run_cmd(argv, env=env).seconds for _ in range(n)]
