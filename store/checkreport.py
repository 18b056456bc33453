"""The result of ``fimio realise --check``: what was compared, what differed, and why.

:class:`CheckReport` is what :func:`fimio.store.check.check_targets` returns. ``render()``
is the terminal text, ``summary()`` the one line of the exit-3 error, ``to_json()`` the
``--json`` form, which ``spec/schemas/check-report.schema.json`` describes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import treediff

# What each variation changes, for reports (spec/reproducibility.md has the details).
VARIATION_TEXT = {
    "tz": "time zone (TZ)",
    "lang": "locale (LANG)",
    "umask": "umask",
    "hostname": "host name",
    "uid": "user id",
    "gid": "group id",
    "cores": "CPU count (FIMIO_BUILD_CORES and CPU affinity)",
    "env_order": "order of the environment variables",
    "build_dir": "build directory path (cwd and TMPDIR)",
    "dir_order": "directory entry order (build directory on the store's filesystem vs a tmpfs)",
}


def show_value(name: str, value) -> str:
    if name == "umask" and isinstance(value, int):
        return f"{value:04o}"
    if value is None and name == "cores":
        return "default"
    return str(value)


@dataclass
class Cause:
    """Why the outputs of a derivation differ.

    ``kind``: ``variation`` (the named variations each change the output on their own),
    ``combination`` (only all of them together do), ``non-deterministic`` (builds under
    identical conditions differ), ``registered-differs`` (every build here agrees, the
    registered output, built earlier or elsewhere, does not), ``host-changed`` (the build
    records show the host paths, builder or fimio version changed since the registered build).
    """

    kind: str
    text: str
    variations: list[str] = field(default_factory=list)
    values: dict[str, list] = field(default_factory=dict)  # variation -> [default, varied]
    hint: str | None = None

    def to_json(self) -> dict:
        return {"kind": self.kind, "text": self.text, "variations": self.variations,
                "values": {k: [show_value(k, v) for v in vs] for k, vs in self.values.items()}, "hint": self.hint}

    def short(self) -> str:
        if self.kind in ("variation", "combination"):
            return ("variation: " if self.kind == "variation" else "combination of: ") + ", ".join(self.variations)
        if self.hint and self.hint.startswith("looks like the current time"):
            return self.kind + ", embedded time"
        return self.kind


@dataclass
class Round:
    number: int
    source: str  # "registered" | "build"
    varied: list[str]
    variation: dict
    digests: dict[str, str]  # output name -> root digest hex

    def to_json(self) -> dict:
        return {"round": self.number, "source": self.source, "varied": self.varied,
                "variation": {k: show_value(k, v) for k, v in self.variation.items()}, "digests": self.digests}


@dataclass
class OutputDiff:
    check_path: str  # logical .check path
    diff: treediff.TreeDiff
    diffoscope: str | None = None

    def to_json(self) -> dict:
        return {"checkPath": self.check_path, "summary": self.diff.summary(),
                "changes": [c.to_json() for c in self.diff.changes], "diffoscope": self.diffoscope}


@dataclass
class OutputCheck:
    output: str
    path: str  # logical output path
    physical: str
    digests: list[str]  # per round
    check_paths: list[str] = field(default_factory=list)
    diffs: list[OutputDiff] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return len(set(self.digests)) <= 1

    def to_json(self) -> dict:
        return {"output": self.output, "path": self.path, "physical": self.physical, "identical": self.identical,
                "digests": self.digests, "checkPaths": self.check_paths, "diffs": [d.to_json() for d in self.diffs]}


@dataclass
class DrvCheck:
    drv: str  # logical .drv path
    name: str
    rounds: list[Round] = field(default_factory=list)
    outputs: list[OutputCheck] = field(default_factory=list)
    cause: Cause | None = None
    builds: int = 0  # builds this check ran (rounds, control and bisect)
    bisect_builds: int = 0
    skipped: str | None = None
    baseline: str = ""  # where round 1 came from

    @property
    def result(self) -> str:
        if self.skipped:
            return "skipped"
        return "identical" if all(o.identical for o in self.outputs) else "different"

    def to_json(self) -> dict:
        return {"drv": self.drv, "name": self.name, "result": self.result, "skipped": self.skipped,
                "baseline": self.baseline, "builds": self.builds, "bisectBuilds": self.bisect_builds,
                "rounds": [r.to_json() for r in self.rounds],
                "cause": self.cause.to_json() if self.cause else None,
                "outputs": [o.to_json() for o in self.outputs]}


@dataclass
class CheckReport:
    rounds: int
    vary: bool
    varied: list[str] = field(default_factory=list)
    not_varied: dict[str, str] = field(default_factory=dict)
    entries: list[DrvCheck] = field(default_factory=list)
    failures: list = field(default_factory=list)  # with keep_going: errors of checks that could not be done

    @property
    def ok(self) -> bool:
        return all(e.result != "different" for e in self.entries)

    @property
    def passed(self) -> bool:
        """Every output checked is bit-identical, and no check failed to be done."""
        return self.ok and not self.failures

    def summary(self) -> str:
        bad = [e for e in self.entries if e.result == "different"]
        if not bad:
            n = sum(len(e.outputs) for e in self.entries)
            skipped = sum(1 for e in self.entries if e.skipped)
            text = f"{n} output{'s' if n != 1 else ''} bit-identical in {self.rounds} builds"
            if skipped:  # a fixed output is not rebuilt: its declared hash vouches for it
                text += f"; {skipped} derivation{'s' if skipped != 1 else ''} skipped"
            return text
        parts = [f"{e.name} ({e.cause.short() if e.cause else 'differs'})" for e in bad]
        return "not reproducible: " + "; ".join(parts)

    def to_json(self) -> dict:
        return {"ok": self.passed, "rounds": self.rounds, "vary": self.vary, "varied": self.varied,
                "notVaried": self.not_varied, "summary": self.summary(),
                "derivations": [e.to_json() for e in self.entries],
                "failures": [e.message for e in self.failures]}

    def render(self) -> str:
        lines = [f"check: {self.rounds} builds per derivation"
                 + (f", varying {', '.join(self.varied)}" if self.vary else ", no variation (add --vary to vary)")]
        for name, why in self.not_varied.items():
            lines.append(f"  not varied: {name}: {why}")
        for e in self.entries:
            lines.extend(_render_entry(e))
        lines.extend(f"✗ check not done: {e.message}" for e in self.failures)
        if self.passed:  # otherwise the error line carries the summary
            lines.append(self.summary())
        return "\n".join(lines)


def _render_entry(e: DrvCheck) -> list[str]:
    if e.skipped:
        return [f"- {e.name}: skipped ({e.skipped})"]
    if e.result == "identical":
        outs = ", ".join(o.output for o in e.outputs)
        return [f"✓ {e.name}: bit-identical in {len(e.rounds)} builds ({outs}; {e.baseline})"]
    lines = [f"✗ {e.name}: NOT reproducible   {e.drv}"]
    sets: list[dict] = []
    for r in e.rounds:
        what = "registered output" if r.source == "registered" else "rebuild"
        if r.varied and r.variation not in sets:
            sets.append(r.variation)
        how = f"varied (set {'AB'[sets.index(r.variation)] if len(sets) <= 2 else len(sets)})" if r.varied else "defaults"
        digests = "  ".join(f"{n} {d[:16]}…" for n, d in r.digests.items())
        lines.append(f"    round {r.number}: {what:17}  {how:14}  {digests}")
    if e.cause is not None:
        lines.append(f"    cause: {e.cause.text}")
        for name, (a, b) in e.cause.values.items():
            lines.append(f"      {name}: {show_value(name, a)} -> {show_value(name, b)}")
        if e.cause.hint:
            lines.append(f"      hint: {e.cause.hint}")
        if e.bisect_builds:
            lines.append(f"      ({e.bisect_builds} extra build{'s' if e.bisect_builds != 1 else ''} to find it)")
    for o in e.outputs:
        if o.identical:
            lines.append(f"    output {o.output}: identical")
            continue
        lines.append(f"    output {o.output}: differs   {o.path}")
        for d in o.diffs:
            lines.append(f"      kept as {d.check_path}  ({d.diff.summary()})")
            lines.extend(treediff.render(d.diff, indent="        ", limit=20))
            if d.diffoscope:
                lines.append("        diffoscope:")
                lines.extend("          " + line for line in d.diffoscope.rstrip("\n").splitlines()[:200])
            lines.append(f"      explain: fimio diff {o.path} {d.check_path}")
    return lines
