#!/usr/bin/env python3
"""Run fimio and its peer (Nix) side by side; print a Markdown table of medians and ratios.

    python bench/run.py store                 # one group
    python bench/run.py store --runs 3 --json out.json
    python bench/run.py all                   # every registered group

Each benchmark group is a module in this directory registered in ``GROUPS`` below. A group
module defines ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args, workdir, nix, notes) -> (rows, trees_used)``; see ``store_bench.py``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common as bench_common  # noqa: E402
import trees  # noqa: E402
from common import have_nix, log, machine_info, row_json, table  # noqa: E402

# group name -> module in bench/. Add "realise", "cache", "bundle" here as they are written.
GROUPS = {
    "store": "store_bench",
    "realise": "realise_bench",
    "repro": "repro",
    "cache": "cache_bench",
    "bundle": "bundle_bench",
}


def _load(name: str):
    return importlib.import_module(GROUPS[name])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bench/run.py",
        description="Benchmark fimio against Nix on the same trees: medians, ratios fimio/peer, targets.",
        epilog="Trees are cached under the work directory (see bench/trees.py). Quote ratios, not times.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--workdir", default=trees.DEFAULT_WORKDIR,
                        help=f"where trees and scratch stores live (default {trees.DEFAULT_WORKDIR}); "
                             "keep it on the filesystem you want to measure")
    common.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    common.add_argument("--seed", type=int, default=trees.BIG_SEED, help="seed of the generated big tree")
    common.add_argument("--no-install", action="store_true",
                        help="time the fimio of the running Python environment instead of a wheel "
                             "install of this checkout under WORKDIR/venv")
    common.add_argument("--no-peer", action="store_true", help="do not run the peer even if it is installed")
    common.add_argument("--after-delete-wait", type=float, default=bench_common.QUIET_AFTER_DELETE, metavar="S",
                        help="before timing, wait until S seconds have passed since the harness last deleted "
                             "a large tree (default %(default)g; see README)")
    sub = ap.add_subparsers(dest="group", required=True, metavar="GROUP")
    for name in GROUPS:
        mod = _load(name)
        p = sub.add_parser(name, parents=[common], help=mod.HELP, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
    p = sub.add_parser("all", parents=[common], help="every group, with its default settings")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    bench_common.QUIET_AFTER_DELETE = args.after_delete_wait
    names = list(GROUPS) if args.group == "all" else [args.group]
    os.makedirs(args.workdir, exist_ok=True)
    if args.no_install or not bench_common.install_fimio(args.workdir):
        bench_common.compile_fimio()
    log(f"timing {bench_common.fimio_argv()[0]}")
    nix = have_nix() and not args.no_peer
    if not nix:
        log("nix-store not found (or --no-peer): the peer columns are skipped")
    result = {"machine": machine_info(), "workdir": os.path.abspath(args.workdir), "peer": "nix" if nix else None,
              "groups": {}}
    for name in names:
        mod = _load(name)
        gargs = args
        if args.group == "all":  # fill in the group's defaults
            p = argparse.ArgumentParser(add_help=False)
            mod.add_arguments(p)
            gargs = argparse.Namespace(**{**vars(p.parse_args([])), **vars(args)})
        notes: list[str] = []
        if not nix:
            notes.append("peer (nix-store) not available: peer and ratio columns skipped")
        rows, used = mod.run(gargs, args.workdir, nix, notes)
        print(f"\n## {name}\n")
        print(table(rows))
        print()
        for t in used:
            print(f"- tree {t.describe()}")
        for n in notes:
            print(f"- {n}")
        sys.stdout.flush()
        result["groups"][name] = {
            "rows": [row_json(r) for r in rows],
            "trees": [{k: v for k, v in vars(t).items()} for t in used],
            "notes": notes,
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        log(f"wrote {args.json}")
    missed = [r["work"] for g in result["groups"].values() for r in g["rows"] if r["met"] is False]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
