"""Turning store records into text and JSON for the terminal."""

from __future__ import annotations

from fimio.store.tree import format_digest


def names_json(store, path) -> dict:
    """A store path's two names: ``{"path": logical, "physical": physical}``."""
    return {"path": store.logical(path), "physical": store.physical(path)}


def path_json(store, info, closure_size: int | None = None) -> dict:
    """The JSON record of a valid path, with logical and physical names."""
    record = {
        "path": store.logical(info.path),
        "physical": store.physical(info.path),
        "hash": info.path.hash_part,
        "name": info.path.name,
        "digest": format_digest(info.root),
        "size": info.size,
        "references": [store.logical(r) for r in info.references],
        "deriver": store.logical_base(info.deriver) if info.deriver else None,
        "registered": iso_time(info.registered),
        "ca": info.ca,
        "signatures": info.signatures,
    }
    if closure_size is not None:
        record["closureSize"] = closure_size
    return record


def iso_time(t: float) -> str:
    import datetime  # only records shown need it: kept out of start-up

    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).isoformat(timespec="seconds")


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
