"""Acceptance tests of ``fimio realise`` and the build commands around it.

Every shipped example realises; a second realise is a no-op; the ``.drv`` and the TOML
give the same outputs; two stores with different physical roots agree on every output
path and root digest; four concurrent realises of a 50-derivation graph build each
derivation exactly once; ``-j``; out-links and their GC roots; ``--keep-failed``;
``fimio log``, ``why-depends`` and ``run``.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import time

import pytest

from conftest import STORE_DIR, assert_one_error_line, fimio_env, fimio_executable, run_fimio, run_on_terminal
from fimio.store.local import LocalStore
from fimio.store.realise import build_records
from test_sandbox import EXAMPLES, FileServer, fetch_example_copy, out_of, outputs_of, realise_json, write_drv


def open_store(root) -> LocalStore:
    return LocalStore(str(root), STORE_DIR)


def all_records(root) -> list[dict]:
    """Every build record of the store, straight from the LMDB ``records`` sub-database."""
    from fimio.store.db import loads

    s = open_store(root)
    try:
        with s.db.read() as txn:
            return [loads(v) for _, v in txn.cursor(db=s.db.dbs["records"])]
    finally:
        s.close()


class Examples:
    """The shipped examples realised into one root: ``targets[name]`` = realise --json."""

    def __init__(self, root, work, server_url):
        self.root = root
        self.fetch_dir = fetch_example_copy(work / "fetch", f"{server_url}/greeting.txt")
        self.files = {
            "hello": EXAMPLES / "hello" / "hello.toml",
            "report": EXAMPLES / "graph" / "report.toml",
            "shout": self.fetch_dir / "use.toml",
        }
        self.results = {}

    def realise_all(self, root) -> dict:
        results = {}
        for name, f in self.files.items():
            proc = run_fimio(["realise", "--json", "--no-out-link", f], root, check=0)
            results[name] = json.loads(proc.stdout)
        return results


@pytest.fixture(scope="module")
def server():
    srv = FileServer(EXAMPLES / "fetch" / "files")
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def examples(tmp_path_factory, server):
    work = tmp_path_factory.mktemp("examples")
    ex = Examples(work / "root", work, server.url)
    ex.results = ex.realise_all(ex.root)
    return ex


def closure_digests(root, physical) -> dict:
    """{logical path: digest} over the closure of a store path, via ``path-info -r --json``."""
    infos = json.loads(run_fimio(["path-info", "-r", "--json", physical], root, check=0).stdout)
    return {i["path"]: i["digest"] for i in infos}


# ---- the examples ---------------------------------------------------------------------

def test_each_example_realises(examples):
    r = examples.results
    hello = pathlib.Path(out_of(r["hello"])[1])
    assert os.access(hello / "bin" / "hello", os.X_OK)
    assert r["hello"]["built"] == [r["hello"]["targets"][0]["drvPath"]]
    report = pathlib.Path(out_of(r["report"])[1])
    assert len(r["report"]["built"]) == 3  # libgreet, greeter, greetings-report
    names = (EXAMPLES / "graph" / "data" / "names.txt").read_text().split()
    greetings = (report / "greetings.txt").read_text().splitlines()
    assert len(greetings) == len(names) and int((report / "count").read_text()) == len(names)
    assert all(any(n in g for g in greetings) for n in names)
    shout = pathlib.Path(out_of(r["shout"])[1])
    assert shout.read_text() == (EXAMPLES / "fetch" / "files" / "greeting.txt").read_text().upper()
    assert len(r["shout"]["built"]) == 2  # the fetch and the consumer


def test_realise_shows_its_progress_on_a_terminal_only(tmp_path):
    report = EXAMPLES / "graph" / "report.toml"
    code, out, shown = run_on_terminal(["realise", "--no-out-link", report], tmp_path / "a")
    assert code == 0 and out.strip()
    assert "\r\x1b[K[0/3 built, 1 running] libgreet" in shown
    assert "\r\x1b[K[2/3 built, 1 running] greetings-report" in shown
    assert shown.endswith("\r\x1b[Kbuilt 3, substituted 0\r\n")  # erased before the summary
    proc = run_fimio(["realise", "--no-out-link", report], tmp_path / "b", check=0)
    assert "\r" not in proc.stderr and "running]" not in proc.stderr


def test_progress_counts_a_failed_build_as_failed_not_running(tmp_path):
    bad = write_drv(tmp_path / "bad.toml", "bad", "exit 3")
    slow = write_drv(tmp_path / "slow.toml", "slow", "sleep 0.5; echo > $out")
    code, _, shown = run_on_terminal(["realise", "--no-out-link", "-k", "-j", "2", bad, slow], tmp_path / "a")
    assert code == 1
    assert "\r\x1b[K[0/2 built, 1 failed, 1 running] slow" in shown, shown


def test_second_realise_is_a_noop(examples):
    records = len(all_records(examples.root))
    for name, f in examples.files.items():
        proc = run_fimio(["realise", "--json", "--no-out-link", f], examples.root, check=0)
        again = json.loads(proc.stdout)
        assert again["built"] == [] and again["substituted"] == [], name
        assert again["targets"] == examples.results[name]["targets"]
        assert "built" not in proc.stderr  # no "built N, substituted M" line when nothing happened
    assert len(all_records(examples.root)) == records


def test_realise_of_the_drv_equals_realise_of_the_toml(examples):
    for name, result in examples.results.items():
        target = result["targets"][0]
        for given in (target["drvPath"], target["physical"], os.path.basename(target["drvPath"]).split("-")[0]):
            r = json.loads(run_fimio(["realise", "--json", "--no-out-link", given], examples.root, check=0).stdout)
            assert r["built"] == [] and r["targets"] == [target], (name, given)


def test_plain_output_lists_physical_paths(examples):
    proc = run_fimio(["realise", "--no-out-link", *examples.files.values()], examples.root, check=0)
    want = [out_of(r)[1] for r in examples.results.values()]
    assert proc.stdout.splitlines() == want
    assert all(p.startswith(str(examples.root / "store") + "/") for p in want)


def test_same_outputs_for_different_physical_roots(examples, tmp_path):
    other = tmp_path / "a" / "much" / "deeper" / "physical-root"
    results = examples.realise_all(other)
    for name, r in results.items():
        mine = examples.results[name]["targets"][0]
        theirs = r["targets"][0]
        assert theirs["drvPath"] == mine["drvPath"], name
        assert {n: o["path"] for n, o in theirs["outputs"].items()} == {n: o["path"] for n, o in mine["outputs"].items()}
        assert theirs["physical"] != mine["physical"]
        a = closure_digests(examples.root, out_of(examples.results[name])[1])
        b = closure_digests(other, out_of(r)[1])
        assert a == b, f"{name}: outputs differ between physical roots"
        assert len(r["built"]) == len(examples.results[name]["built"])


# ---- concurrency and -j --------------------------------------------------------------

def make_layers(d: pathlib.Path, layers: int = 5, width: int = 10) -> list[pathlib.Path]:
    """``layers`` x ``width`` derivations, each depending on the whole layer below."""
    for layer in range(layers):
        for i in range(width):
            inputs = {f"d{j}": {"drv": f"n{layer - 1}_{j}.toml"} for j in range(width)} if layer else {}
            write_drv(d / f"n{layer}_{i}.toml", f"n{layer}-{i}", f"echo {layer}-{i} > $out", inputs=inputs)
    return [d / f"n{layers - 1}_{i}.toml" for i in range(width)]


def test_concurrent_realises_build_each_derivation_once(tmp_path):
    tops = make_layers(tmp_path / "graph")
    root = tmp_path / "root"
    procs = [
        subprocess.Popen([fimio_executable(), "realise", "--json", "--no-out-link", *tops], env=fimio_env(root),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [json.loads(out) for out, _ in outs]
    assert all(r["targets"] == results[0]["targets"] for r in results)
    built = [b for r in results for b in r["built"]]
    assert len(built) == 50 and len(set(built)) == 50  # every derivation built by exactly one process
    records = all_records(root)
    assert len(records) == 50 and len({r["drvHash"] for r in records}) == 50
    for t in results[0]["targets"]:
        layer_i = pathlib.Path(t["outputs"]["out"]["physical"]).read_text()
        assert layer_i.startswith("4-")
    assert run_fimio(["verify"], root, check=0).stdout == ""


def _intervals(root, drv_hashes) -> list[tuple[float, float]]:
    s = open_store(root)
    try:
        out = []
        for h in drv_hashes:
            (rec,) = build_records(s, h)
            out.append((rec["start"], rec["end"]))
        return sorted(out)
    finally:
        s.close()


def test_jobs(tmp_path):
    def targets(sleep):
        return [write_drv(tmp_path / f"{sleep}" / f"s{i}.toml", f"s{i}", f"sleep {sleep}; echo {i} > $out")
                for i in range(4)]

    serial = run_fimio(["realise", "--json", "--no-out-link", "-j", "1", *targets(0.3)], tmp_path / "r1", check=0)
    iv = _intervals(tmp_path / "r1", [t["drvHash"] for t in json.loads(serial.stdout)["targets"]])
    assert all(b[0] >= a[1] for a, b in zip(iv, iv[1:])), f"-j 1 ran builds at the same time: {iv}"
    # long enough builds that all four start before the first ends, even on a loaded machine
    parallel = run_fimio(["realise", "--json", "--no-out-link", "-j", "4", *targets(1.5)], tmp_path / "r4", check=0)
    assert len(json.loads(parallel.stdout)["built"]) == 4
    iv = _intervals(tmp_path / "r4", [t["drvHash"] for t in json.loads(parallel.stdout)["targets"]])
    assert max(s for s, _ in iv) < min(e for _, e in iv), f"-j 4 did not run the 4 builds at once: {iv}"
    assert_one_error_line(run_fimio(["realise", "-j", "-1", *targets(0.3)], tmp_path / "r4"), 2, "-j")


# ---- out-links -------------------------------------------------------------------------

def _roots(cli) -> dict:
    """``fimio roots --json`` as ``{root: logical path}`` (each entry's physical name checked)."""
    roots = json.loads(cli.out("roots", "--json"))
    for names in roots.values():
        assert names["physical"] == str(cli.physical_store / os.path.basename(names["path"]))
    return {root: names["path"] for root, names in roots.items()}


def test_out_links_and_roots(cli, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    m = write_drv(tmp_path / "m.toml", "multi", "mkdir $out $dev; echo o > $out/o; echo d > $dev/d",
                  outputs=["out", "dev"])
    s = write_drv(tmp_path / "s.toml", "single", "echo s > $out")
    mo, so = outputs_of(cli, m), outputs_of(cli, s)
    phys = lambda logical: str(cli.physical_store / os.path.basename(logical))  # noqa: E731

    r = json.loads(cli.out("realise", "--json", m, cwd=work))
    assert os.readlink(work / "result") == phys(mo["out"])
    assert os.readlink(work / "result-dev") == phys(mo["dev"])
    assert r["outLinks"] == {str(work / "result"): mo["out"], str(work / "result-dev"): mo["dev"]}
    assert (work / "result-dev" / "d").read_text() == "d\n"
    roots = _roots(cli)
    assert roots[str(work / "result")] == mo["out"] and roots[str(work / "result-dev")] == mo["dev"]
    listed = cli.out("roots").splitlines()
    assert f"{work / 'result'} -> {phys(mo['out'])}" in listed

    # --out-link, several targets: NAME, NAME-2, NAME-2-dev
    (tmp_path / "links").mkdir()
    r = json.loads(cli.out("realise", "--json", "--out-link", tmp_path / "links" / "x", s, m, cwd=work))
    base = tmp_path / "links" / "x"
    assert r["outLinks"] == {str(base): so["out"], f"{base}-2": mo["out"], f"{base}-2-dev": mo["dev"]}
    assert os.readlink(f"{base}-2-dev") == phys(mo["dev"])
    assert {str(base), f"{base}-2", f"{base}-2-dev"} <= set(_roots(cli))

    # realising something else replaces ./result
    cli.out("realise", s, cwd=work)
    assert os.readlink(work / "result") == phys(so["out"])
    assert _roots(cli)[str(work / "result")] == so["out"]

    # --no-out-link creates no link and no root
    empty = tmp_path / "empty"
    empty.mkdir()
    before = _roots(cli)
    r = json.loads(cli.out("realise", "--json", "--no-out-link", m, s, cwd=empty))
    assert r["outLinks"] == {} and os.listdir(empty) == []
    assert _roots(cli) == before

    # deleting an out-link removes the root
    os.unlink(work / "result-dev")
    assert str(work / "result-dev") not in _roots(cli)


def test_keep_failed(cli, tmp_path):
    f = write_drv(tmp_path / "k.toml", "kept", "echo partial > partial.txt; mkdir -p sub; echo oops; exit 2")
    proc = cli("realise", "--no-out-link", "--keep-failed", f)
    assert proc.returncode == 1
    last = proc.stderr.splitlines()[-1]
    assert "build directory kept at '" in last
    kept = pathlib.Path(last.split("build directory kept at '")[1].split("'")[0])
    assert kept.is_dir() and (kept / "partial.txt").read_text() == "partial\n" and (kept / "sub").is_dir()
    assert kept.parent.parent == cli.root / "failed"
    # the same failure without -K leaves nothing behind, and the kept directory survives
    proc = cli("realise", "--no-out-link", f)
    assert proc.returncode == 1 and "build directory kept" not in proc.stderr
    assert [e for e in os.listdir(cli.root / "tmp") if e.startswith("build-")] == []
    assert os.listdir(cli.root / "failed") == [kept.parent.name] and kept.is_dir()


def test_keep_going_builds_everything_that_does_not_need_a_failure(cli, tmp_path):
    """-k: a failed build stops only what needs it; the error names each failure and what
    was not built, and the builds that could run are valid. Without -k the first failure
    stops the schedule."""
    bad = write_drv(tmp_path / "bad.toml", "bad", "echo broken >&2; exit 3")
    worse = write_drv(tmp_path / "worse.toml", "worse", "echo worse news >&2; exit 4")
    needs = write_drv(tmp_path / "needs.toml", "needs", "cat $bad > $out", inputs={"bad": {"drv": "bad.toml"}})
    top = write_drv(tmp_path / "top.toml", "top", "cat $needs > $out", inputs={"needs": {"drv": "needs.toml"}})
    ok = write_drv(tmp_path / "ok.toml", "ok", "echo fine > $out")
    proc = cli("realise", "--no-out-link", "-j", "1", "-k", bad, worse, top, ok)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fimio: error: 2 derivation(s) failed, 2 not built"), proc.stderr
    details = proc.stderr.strip().splitlines()[:-1]
    for name in ("bad", "worse"):  # each failure with its own hint, as alone it would have
        assert any(f"-{name}.drv' failed with exit code" in line and "(see 'fimio log " in line
                   for line in details), proc.stderr
    for name in ("needs", "top"):
        assert any(f"-{name}.drv: not built, it needs " in line and "-bad.drv, which failed" in line
                   for line in details), proc.stderr
    for name, line in (("bad", "  > broken"), ("worse", "  > worse news")):  # each failure's log tail
        header = next(i for i, h in enumerate(details) if h.startswith("last ") and f"-{name}.drv:" in h)
        assert details[header].startswith("last log line of "), details[header]  # one line: singular
        assert details[header + 1] == line, proc.stderr
    assert cli.out("realise", "-n", ok).strip() == "nothing to do: every output is valid", "-k did not build ok"
    # one failure whose dependents are skipped keeps its log tail on stderr
    proc = cli("realise", "--no-out-link", "-k", top)
    assert proc.returncode == 1 and "> broken" in proc.stderr and "1 derivation(s) failed, 2 not built" in proc.stderr
    # without -k: the first failure stops every build not yet started (one at a time here)
    other = write_drv(tmp_path / "other.toml", "other", "echo other > $out")
    proc = cli("realise", "--no-out-link", "-j", "1", bad, other)
    assert proc.returncode == 1 and "derivation(s) failed" not in proc.stderr
    valid = cli("realise", "--no-out-link", "-n", other, check=0).stdout
    assert valid.startswith("1 derivation(s) would be built"), "a build started after a failure without -k"



def test_keep_going_prints_and_links_the_targets_that_succeeded(cli, tmp_path):
    # -k: what was made valid is printed and linked as it would be had nothing failed
    # (the second target's link is result-2 whatever happened to the first), then the error
    bad = write_drv(tmp_path / "bad.toml", "bad", "echo broken >&2; exit 3")
    ok = write_drv(tmp_path / "ok.toml", "ok", "echo fine > $out")
    proc = cli("realise", "-k", "-j", "1", bad, ok, cwd=tmp_path)
    assert proc.returncode == 1 and "-bad.drv' failed with exit code 3" in proc.stderr, proc.stderr
    (printed,) = proc.stdout.split()
    assert printed.endswith("-ok") and open(printed).read() == "fine\n"
    assert os.readlink(tmp_path / "result-2") == printed and not os.path.lexists(tmp_path / "result")
    assert printed in cli.out("roots")

def test_json_is_printed_when_realise_fails(cli, tmp_path):
    """--json prints its object on stdout even when realise fails, so a script learns what
    was built before the failure: ``ok`` false, the ``error``, and the targets made valid."""
    bad = write_drv(tmp_path / "bad.toml", "bad", "echo broken >&2; exit 3")
    ok = write_drv(tmp_path / "ok.toml", "ok", "echo fine > $out")
    proc = cli("realise", "--no-out-link", "--json", "-k", "-j", "1", bad, ok)
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    assert result["ok"] is False and result["error"]["exitCode"] == 1, result
    assert "-bad.drv' failed with exit code 3" in result["error"]["message"], result
    assert [t["drvPath"].endswith("-ok.drv") for t in result["targets"]] == [True], result
    assert len(result["built"]) == 1 and result["built"][0].endswith("-ok.drv"), result
    assert proc.stderr.strip().splitlines()[-1].startswith("fimio: error: "), "the error line stays on stderr"
    # a failure to load the targets: nothing was done, and the JSON says so
    proc = cli("realise", "--no-out-link", "--json", tmp_path / "missing.toml")
    gone = json.loads(proc.stdout)
    assert proc.returncode == 5 and gone["ok"] is False and gone["error"]["exitCode"] == 5, gone
    assert (gone["targets"], gone["built"], gone["substituted"], gone["checks"]) == ([], [], [], None)
    # success: ok, no error
    done = json.loads(cli.out("realise", "--no-out-link", "--json", ok))
    assert done["ok"] is True and done["error"] is None and done["built"] == []
    # a derivation is named as every path is in --json: {path, physical} (drvPath: Nix's name)
    for drv in (done["targets"][0], json.loads(cli.out("instantiate", "--json", ok))[0]):
        assert drv["path"] == drv["drvPath"] and drv["physical"].endswith("/" + drv["path"].rsplit("/", 1)[1])


def test_json_is_printed_when_the_system_fails_too(cli, tmp_path, monkeypatch, capsys):
    """A full disk (an OSError, exit 1) under --json: the object is printed as for any failure."""
    import errno
    import gc as collector

    import fimio.cli
    from fimio.store.realise import Realiser

    def full_disk(self, targets, before_build=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(cli.root / "tmp"))

    f = write_drv(tmp_path / "d.toml", "d", "echo d > $out")
    monkeypatch.setattr(Realiser, "realise", full_disk)
    monkeypatch.setenv("FIMIO_ROOT", str(cli.root))
    monkeypatch.setenv("FIMIO_CONFIG", os.devnull)
    try:
        assert fimio.cli.run(["realise", "--json", "--no-out-link", str(f)]) == 1
    finally:
        collector.enable()
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False and result["error"]["exitCode"] == 1, result
    assert result["error"]["message"].startswith("No space left on device"), result


def test_keep_going_exits_with_the_gravest_failure(cli, tmp_path):
    """-k with a build failure (1), a fetch of nothing (5) and a fixed-output hash mismatch
    (4): exit 4 whichever finished first, all named; without the mismatch, 5."""
    (tmp_path / "data.txt").write_text("data\n")
    fod = tmp_path / "fod.toml"
    fod.write_text(f'name = "data.txt"\n[fetch]\nurl = "file://{tmp_path / "data.txt"}"\nhash = "sha256:{"0" * 64}"\n')
    bad = write_drv(tmp_path / "bad.toml", "bad", "exit 3")
    gone = tmp_path / "gone.toml"  # not found (5): a fetch of a file that does not exist
    gone.write_text(f'name = "gone.txt"\n[fetch]\nurl = "file://{tmp_path / "nope.txt"}"\nhash = "sha256:{"1" * 64}"\n')
    for order in ((bad, gone, fod), (fod, gone, bad)):
        proc = cli("realise", "--no-out-link", "-k", "-j", "1", *order)
        assert proc.returncode == 4, proc.stderr
        assert "3 derivation(s) failed" in proc.stderr and "hash mismatch" in proc.stderr, proc.stderr
    assert cli("realise", "--no-out-link", "-k", bad, gone).returncode == 5


@pytest.mark.parametrize("setting, needle", [
    ("jobs = -3", "'jobs' must be 0 (the default) or more, not -3"),
    ("cores = -1", "'cores' must be 0 (the default) or more, not -1"),
    ('jobs = "4"', "'jobs' must be a whole number"),
    ("offline = 1", "'offline' must be true or false"),
    ('substituters = "file:///c"', "'substituters' must be a list"),
    ('trusted-public-keys = ["team-1:AAAA"]', "'trusted-public-keys': invalid public key 'team-1:AAAA'"),
    ("trusted-public-keys = [1]", "'trusted-public-keys' must be a list of public keys"),
    ("secret-key-files = [true]", "'secret-key-files' must be a list of file names"),
    ('[tokens]\n"http://h" = 5', "every value under [tokens] must be a token"),
])
def test_a_bad_config_value_is_one_usage_error(cli, tmp_path, setting, needle):
    f = write_drv(tmp_path / "c.toml", "c", "echo c > $out")
    config = tmp_path / "config.toml"
    config.write_text(setting + "\n")
    assert_one_error_line(cli("realise", "--no-out-link", f, env={"FIMIO_CONFIG": config}), 2, str(config), needle)
    # the same when the outputs are valid already (the no-op fast path)
    cli.out("realise", "--no-out-link", f)
    assert_one_error_line(cli("realise", "--no-out-link", f, env={"FIMIO_CONFIG": config}), 2, str(config), needle)


def test_a_bad_substituter_in_the_config_is_bad_usage_even_for_a_no_op(cli, tmp_path):
    f = write_drv(tmp_path / "c.toml", "c", "echo c > $out")
    config = tmp_path / "config.toml"
    config.write_text('substituters = ["ftp://x"]\n')
    assert_one_error_line(cli("realise", "--no-out-link", f, env={"FIMIO_CONFIG": config}), 2, "ftp://x")
    cli.out("realise", "--no-out-link", f)  # valid now: the no-op fast path
    assert_one_error_line(cli("realise", "--no-out-link", f, env={"FIMIO_CONFIG": config}), 2, "ftp://x")


def test_a_config_file_named_by_fimio_config_must_exist(cli, tmp_path):
    """A typo in FIMIO_CONFIG must not silently drop the keys and caches; /dev/null means none."""
    f = write_drv(tmp_path / "c.toml", "c", "echo c > $out")
    missing = tmp_path / "conf.tmol"
    assert_one_error_line(cli("realise", "--no-out-link", f, env={"FIMIO_CONFIG": missing}), 2,
                          f"config file '{missing}' (FIMIO_CONFIG) does not exist", "FIMIO_CONFIG=/dev/null")
    cli.out("realise", "--no-out-link", f, env={"FIMIO_CONFIG": os.devnull})
    assert_one_error_line(cli("realise", "--no-out-link", f, env={"FIMIO_CONFIG": missing}), 2, "does not exist")
    # no FIMIO_CONFIG and no file at the default place: the defaults
    assert cli("realise", "--no-out-link", f, env={"FIMIO_CONFIG": "", "XDG_CONFIG_HOME": tmp_path}).returncode == 0


def test_jobs_zero_means_the_default_as_in_the_config_file(cli, tmp_path):
    f = write_drv(tmp_path / "j.toml", "j", "echo j > $out")
    assert open(cli.out("realise", "--no-out-link", "-j", "0", f)).read() == "j\n"


def test_no_out_link_and_an_out_link_name_exclude_each_other(cli, tmp_path):
    f = write_drv(tmp_path / "x.toml", "x", "echo x > $out")
    cli.out("realise", "--no-out-link", f)  # valid: the no-op fast path would run next
    for env in ({}, {"FIMIO_NO_FAST_PATH": "1"}):
        assert_one_error_line(cli("realise", "--no-out-link", "-o", tmp_path / "r", f, env=env), 2,
                              "--no-out-link and -o/--out-link")
    assert not os.path.lexists(tmp_path / "r")
    for env in ({}, {"FIMIO_NO_FAST_PATH": "1"}):  # an empty name is no ./result
        for args in (["-o", ""], ["--out-link="], ["--no-out-link", "--out-link="]):
            assert_one_error_line(cli("realise", *args, f, env=env, cwd=tmp_path), 2, "out-link name", "empty")
    assert not os.path.lexists(tmp_path / "result")


def test_a_plain_store_path_not_here_points_to_copy(cli, tmp_path):
    plain, drv = f"{STORE_DIR}/{'a' * 32}-data", f"{STORE_DIR}/{'b' * 32}-x.drv"
    proc = cli("realise", "--no-out-link", plain, drv)
    assert proc.returncode == 5, proc.stderr
    assert f"{plain}: not in this store, and no derivation ('fimio copy --from URL {plain}' fetches it)" in proc.stderr
    assert f"{drv}: not in this store\n" in proc.stderr


def test_cores_flag_sets_the_build_cores(cli, tmp_path):
    f = write_drv(tmp_path / "c.toml", "cores", "echo $FIMIO_BUILD_CORES > $out")
    assert open(cli.out("realise", "--no-out-link", "--cores", "3", f).strip()).read() == "3\n"
    assert_one_error_line(cli("realise", "--cores", "-1", f), 2, "--cores")
    # 0 = all, as in the config file, and it overrides the config's value
    config = tmp_path / "config.toml"
    config.write_text("cores = 1\n")
    all_cores = f"{len(os.sched_getaffinity(0))}\n"
    g = write_drv(tmp_path / "d.toml", "cores-all", "echo $FIMIO_BUILD_CORES > $out")
    env = {"FIMIO_CONFIG": str(config)}
    assert open(cli.out("realise", "--no-out-link", "--cores", "0", g, env=env).strip()).read() == all_cores
    h = write_drv(tmp_path / "e.toml", "cores-config", "echo $FIMIO_BUILD_CORES > $out")
    assert open(cli.out("realise", "--no-out-link", h, env=env).strip()).read() == "1\n"


# ---- log, why-depends, run ---------------------------------------------------------------

def test_log(cli, tmp_path):
    f = write_drv(tmp_path / "l.toml", "logged", "echo to stdout; echo to stderr >&2; echo done > $out")
    r = realise_json(cli, f)
    want = "to stdout\nto stderr\n"
    target = r["targets"][0]
    for given in (f, target["drvPath"], target["physical"], out_of(r)[0], out_of(r)[1],
                  os.path.basename(out_of(r)[0]).split("-")[0]):
        assert cli.out("log", given) + "\n" == want, given
    (tmp_path / "src").write_text("x")
    src = cli.out("add", tmp_path / "src")
    assert_one_error_line(cli("log", src), 5, "not built by a derivation")


def test_why_depends(cli, tmp_path):
    write_drv(tmp_path / "a.toml", "a", "echo a > $out")
    write_drv(tmp_path / "b.toml", "b", "mkdir $out; echo $a > $out/a-path", inputs={"a": {"drv": "a.toml"}})
    c = write_drv(tmp_path / "c.toml", "c", "echo $b > $out", inputs={"b": {"drv": "b.toml"}})
    r = realise_json(cli, c)
    a, b = outputs_of(cli, tmp_path / "a.toml")["out"], outputs_of(cli, tmp_path / "b.toml")["out"]
    c_out = out_of(r)[0]
    chain = json.loads(cli.out("why-depends", "--json", c_out, a))
    assert [x["path"] for x in chain] == [c_out, b, a]
    assert [x["physical"] for x in chain] == [str(cli.physical_store / os.path.basename(p)) for p in (c_out, b, a)]
    lines = cli.out("why-depends", out_of(r)[1], os.path.basename(a).split("-")[0]).splitlines()
    phys = lambda p: str(cli.physical_store / os.path.basename(p))  # noqa: E731
    assert lines == [phys(c_out), "└───" + phys(b), "    └───" + phys(a)]
    assert_one_error_line(cli("why-depends", a, c_out), 5, "does not depend on")


def test_run(examples):
    hello = out_of(examples.results["hello"])[0]
    run = lambda *a: run_fimio(["run", *a], examples.root, check=0).stdout  # noqa: E731
    assert run(hello, "--", f"{hello}/bin/hello") == "hello, world\n"
    assert run(os.path.basename(hello).split("-")[0], "--", "hello") == "hello, world\n"
    assert run(out_of(examples.results["hello"])[1], "--", "sh", "-c", "test -d $FIMIO_STORE && hello") == "hello, world\n"
    assert_one_error_line(run_fimio(["run", hello, "--", "no-such-command-xyz"], examples.root), 2, "not found")
    for missing in ("/no/such/command", f"{hello}/bin/no-such-command"):
        assert_one_error_line(run_fimio(["run", hello, "--", missing], examples.root), 2, "not found", missing)


def test_run_of_a_symlink_into_the_logical_store(cli, tmp_path):
    """A command that is a symlink to another path at its logical place resolves only inside
    `run`: it must not be refused for not resolving on the host."""
    write_drv(tmp_path / "dep.toml", "dep", "mkdir -p $out/bin; printf '#!/bin/sh\\necho ok\\n' > $out/bin/tool; "
              "chmod +x $out/bin/tool")
    top = write_drv(tmp_path / "top.toml", "top", "mkdir -p $out/bin; ln -s $dep/bin/tool $out/bin/tool",
                    inputs={"dep": {"drv": "dep.toml"}})
    out = cli.out("realise", "--no-out-link", top)
    assert cli.out("run", out, "--", f"{out}/bin/tool") == "ok"


def test_realise_is_quick_when_nothing_is_to_do(examples):
    """A no-op realise of the whole graph example stays cheap (start-up + one lookup)."""
    start = time.monotonic()
    run_fimio(["realise", "--no-out-link", examples.files["report"]], examples.root, check=0)
    assert time.monotonic() - start < 5


def test_log_of_a_rooted_output_after_gc(cli, tmp_path):
    f = write_drv(tmp_path / "l.toml", "logged", "echo hello-log; echo x > $out")
    cli.out("realise", f, cwd=tmp_path)
    cli.out("gc")
    assert cli.out("log", tmp_path / "result") == "hello-log"


def test_derivation_for_another_system_is_not_built(cli, tmp_path):
    from fimio.store.derivation import host_system

    other = "riscv64-linux" if host_system() != "riscv64-linux" else "x86_64-linux"
    f = tmp_path / "other.toml"
    f.write_text(f'name = "other"\nbuilder = "/bin/sh"\nsystem = "{other}"\nargs = ["-c", "echo > $out"]\n')
    out = outputs_of(cli, f)["out"]
    proc = cli("realise", "--no-out-link", f)
    assert proc.returncode == 5 and other in proc.stderr  # not obtainable here (a cache may have it)
    assert cli("path-info", out).returncode == 5


def test_an_out_link_that_cannot_be_made_is_a_usage_error(cli, tmp_path):
    """The output is built and valid; only the link fails: exit 2 naming the link, and
    nothing left next to it."""
    s = write_drv(tmp_path / "s.toml", "single", "echo s > $out")
    work = tmp_path / "work"
    (work / "result").mkdir(parents=True)
    assert_one_error_line(cli("realise", s, cwd=work), 2, f"'{work / 'result'}'", "directory")
    assert os.listdir(work) == ["result"] and os.listdir(work / "result") == []
    assert_one_error_line(cli("realise", s, "-o", tmp_path / "no" / "such" / "link"), 2,
                          f"'{tmp_path / 'no' / 'such' / 'link'}'")
    assert cli.out("realise", "--no-out-link", s).startswith(str(cli.physical_store))


def test_an_out_link_never_replaces_what_is_not_an_earlier_link_into_the_store(cli, tmp_path):
    """As in Nix: a file, or a link to elsewhere, is the user's and stays; an earlier link
    into the store is replaced. The same through the no-op fast path and for --add-root."""
    one = write_drv(tmp_path / "one.toml", "one", "echo 1 > $out")
    two = write_drv(tmp_path / "two.toml", "two", "echo 2 > $out")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("precious\n")
    os.symlink("/etc/hostname", work / "mine")
    for no_fast_path in ("1", ""):  # the full path builds one; then the fast path finds it valid
        env = {"FIMIO_NO_FAST_PATH": no_fast_path} if no_fast_path else {}
        for name, what in (("notes.txt", "a file"), ("mine", "a link to '/etc/hostname'")):
            assert_one_error_line(cli("realise", "-o", work / name, one, env=env), 2, f"'{work / name}'", what)
        assert (work / "notes.txt").read_text() == "precious\n" and os.readlink(work / "mine") == "/etc/hostname"
    assert_one_error_line(cli("instantiate", "--add-root", work / "notes.txt", one), 2, "a file")
    assert (work / "notes.txt").read_text() == "precious\n"
    # a link that only names the store on its way elsewhere is the user's too
    os.symlink(f"{cli.physical_store}/../../../etc", work / "escape")
    assert_one_error_line(cli("realise", "-o", work / "escape", one), 2, "a link to")
    assert_one_error_line(cli("realise", "-o", tmp_path / "one.toml" / "x", one), 2, "cannot make the link",
                          "is not a directory")
    # every link is checked before any is made: result-dev in the way leaves result unmade
    multi = write_drv(tmp_path / "multi.toml", "multi", "echo o > $out; echo d > $dev", outputs=["out", "dev"])
    (work / "m-dev").write_text("mine\n")
    assert_one_error_line(cli("realise", "-o", work / "m", multi), 2, "m-dev")
    assert not os.path.lexists(work / "m") and (work / "m-dev").read_text() == "mine\n"
    (work / "drvs-2").write_text("mine\n")
    assert_one_error_line(cli("instantiate", "--add-root", work / "drvs", one, two), 2, "drvs-2")
    assert not os.path.lexists(work / "drvs")
    cli.out("realise", "-o", work / "result", one)
    cli.out("realise", "-o", work / "result", two)  # an earlier out-link: replaced
    assert os.readlink(work / "result") == str(cli.physical_store / os.path.basename(outputs_of(cli, two)["out"]))


def test_an_out_link_in_the_way_fails_before_the_build(cli, tmp_path):
    """A name in the way is refused at once, not after a long build: nothing is built."""
    (tmp_path / "taken").write_text("mine\n")
    slow = write_drv(tmp_path / "slow.toml", "slow", "echo 1 > $out")
    assert_one_error_line(cli("realise", "-o", tmp_path / "taken", slow), 2, "taken", "a file")
    assert_one_error_line(cli("realise", "-o", tmp_path / "no-dir" / "r", slow), 2, "its directory does not exist")
    assert cli.out("realise", "-n", slow).startswith("1 derivation(s) would be built"), "it was built"


def test_outputs_are_printed_in_one_order_whether_built_or_already_valid(cli, tmp_path):
    m = write_drv(tmp_path / "m.toml", "multi", "mkdir $out $dev $bin", outputs=["out", "dev", "bin"])
    first = cli.out("realise", "--no-out-link", m).splitlines()
    again = cli.out("realise", "--no-out-link", m).splitlines()  # the no-op fast path
    full = cli.out("realise", "--no-out-link", m, env={"FIMIO_NO_FAST_PATH": "1"}).splitlines()
    assert first == again == full
    assert [p.rsplit("-", 1)[1] for p in first] == ["bin", "dev", "multi"]


def test_the_fast_path_trusts_no_forged_drv(cli, tmp_path):
    """A file named like a derivation, whose "outputs" name another derivation's valid
    outputs: the no-op fast path must not print them; the full path refuses it (exit 4)."""
    s = write_drv(tmp_path / "s.toml", "single", "echo s > $out")
    real_drv = cli.out("instantiate", s)
    real_out = cli.out("realise", "--no-out-link", s)
    drv = json.loads(pathlib.Path(real_drv).read_text())
    drv["args"] = ["-c", "echo something else > $out"]  # other contents, the same "outputs"
    from fimio.store.derivation import canonical_json

    (tmp_path / "single.drv").write_bytes(canonical_json(drv))  # canonical, its own name: only its outputs lie
    forged = cli.out("add", tmp_path / "single.drv")
    for target in (forged, os.path.basename(forged)[:32]):
        assert_one_error_line(cli("realise", "--no-out-link", target), 4, "hash to")
    assert cli.out("realise", "--no-out-link", real_drv) == real_out  # the genuine one still takes it


def test_ctrl_c_stops_the_build_at_once_and_registers_nothing(cli, tmp_path):
    import signal
    import subprocess

    slow = write_drv(tmp_path / "slow.toml", "slow", "sleep 30 & mkdir $out; echo done > $out/f; sleep 30")
    out = outputs_of(cli, slow)["out"]
    # as at a terminal: SIGINT handled (a job started in the background of a script, as this
    # test run may be, inherits it ignored, and Python then leaves it ignored)
    proc = subprocess.Popen([fimio_executable(), "realise", "--no-out-link", str(slow)], env=fimio_env(cli.root),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 30
    while not any(e.startswith("build-") for e in os.listdir(cli.root / "tmp")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)  # the builder is running
    start = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - start < 5, "the build went on after Ctrl-C"
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "fimio: error: interrupted", err
    assert cli("path-info", out).returncode == 5
    assert [e for e in os.listdir(cli.root / "tmp") if e.startswith("build-")] == []


def test_a_derivation_file_read_through_a_symlink_is_evaluated_again_when_its_target_changes(cli, tmp_path):
    real = write_drv(tmp_path / "real.toml", "echo", "echo first > $out")
    os.symlink(real, tmp_path / "link.toml")
    first = cli.out("realise", "--no-out-link", tmp_path / "link.toml")
    real.write_text(real.read_text().replace("first", "second"))
    for env in ({}, {"FIMIO_NO_FAST_PATH": "1"}):
        again = cli.out("realise", "--no-out-link", tmp_path / "link.toml", env=env)
        assert again != first and pathlib.Path(again).read_text() == "second\n"


def test_a_log_that_cannot_be_kept_fails_nothing_and_leaves_nothing(cli, tmp_path):
    """The outputs are registered before the log is written: a log that cannot be written
    (here a directory in its place; on a full disk alike) is a warning, not a failed build
    whose outputs are nonetheless valid, and its temp file does not stay behind."""
    drv = write_drv(tmp_path / "logged.toml", "logged", "echo chatter; echo x > $out")
    (info,) = json.loads(cli.out("instantiate", "--json", drv))
    (cli.root / "logs" / f"{info['drvHash']}.log.zst").mkdir(parents=True)
    proc = cli("realise", "--no-out-link", drv)
    assert proc.returncode == 0, proc.stderr
    assert "warning: the build log of" in proc.stderr and "was not kept" in proc.stderr
    assert pathlib.Path(proc.stdout.strip()).read_text() == "x\n"
    assert sorted(p.name for p in (cli.root / "logs").iterdir()) == [f"{info['drvHash']}.log.zst"]
    assert os.listdir(cli.root / "tmp") == []


def test_an_out_link_that_cannot_be_made_a_root_is_taken_back(cli, tmp_path):
    """Registering the out-link as a GC root fails (a directory in the registration's
    place): the command fails, and no out-link is left that gc would turn into a dangling one."""
    import hashlib

    drv = write_drv(tmp_path / "rooted.toml", "rooted", "echo x > $out")
    cli("realise", "--no-out-link", drv, check=0)
    link = tmp_path / "result"
    reg = cli.root / "gcroots" / ("auto-" + hashlib.sha256(str(link).encode()).hexdigest()[:32])
    reg.mkdir()
    for env in ({}, {"FIMIO_NO_FAST_PATH": "1"}):
        proc = cli("realise", drv, "-o", link, env=env)
        assert proc.returncode != 0 and not os.path.lexists(link), (env, proc.stderr)
