"""Regenerate the derivation vectors of spec/derivation.md (run from anywhere).

    python spec/vectors/derivations/make_vectors.py

Instantiates fetch.toml, lib.toml and app.toml into a throw-away store whose logical
store directory is /fimio/store and writes, for each, ``<file>.drv.json`` (the exact
bytes of the .drv file) and an entry in ``vectors.json`` (drv path, drv hash modulo,
output paths, the .drv's references, and the source paths added on the way).

Only regenerate on purpose: the vectors pin the format, and tests/test_derivation.py
recomputes every value independently from the spec's formulas.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import blake3

HERE = os.path.dirname(os.path.abspath(__file__))
FILES = ["fetch.toml", "lib.toml", "app.toml"]
STORE_DIR = "/fimio/store"


def main() -> None:
    from fimio.store.instantiate import Graph
    from fimio.store.local import LocalStore

    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp, STORE_DIR)
        try:
            graph = Graph(store)
            vectors = {"storeDir": STORE_DIR, "derivations": {}, "sources": {}}
            for name in FILES:
                drv = graph.from_file(os.path.join(HERE, name))
                info = store.info(drv.drv_path)
                with open(store.physical(drv.drv_path), "rb") as f:
                    data = f.read()
                with open(os.path.join(HERE, name + ".drv.json"), "wb") as f:
                    f.write(data)
                vectors["derivations"][name] = {
                    "drvPath": store.logical(drv.drv_path),
                    "drvHash": drv.drv_hash,
                    "outputs": dict(drv.outputs),
                    "references": sorted(store.logical(r) for r in info.references),
                    "drvBlake3": blake3.blake3(data).hexdigest(),  # part1 of the text path
                }
                for i in drv.inputs.values():
                    if i.kind == "src":
                        root = store.info(store.resolve(i.path)[0]).root.hex()
                        vectors["sources"][i.path] = {"rootDigest": root}
        finally:
            store.close()
    with open(os.path.join(HERE, "vectors.json"), "w") as f:
        json.dump(vectors, f, indent=2, sort_keys=True, ensure_ascii=False)
        f.write("\n")
    json.dump(vectors, sys.stdout, indent=2, sort_keys=True, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main()
