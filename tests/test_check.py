"""``fimio realise --check [--rounds N] [--vary]`` through the real console script.

A corpus of small derivations, each deterministic except for one planted cause; the check
must exit 3 and name that cause (spec/reproducibility.md). The deterministic control must
pass five varied rounds. Reports are validated against spec/schemas/check-report.schema.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import pytest

from minischema import validate_both

SCHEMA = json.loads((pathlib.Path(__file__).parent.parent / "spec" / "schemas" / "check-report.schema.json").read_text())

DRV = """name = "{name}"
builder = "/bin/sh"
args = ["-c", {script}]
{outputs}
[env]
PATH = "/usr/bin:/bin"
{env}
{sandbox}
"""


def write_drv(directory: pathlib.Path, name: str, script: str, outputs=None, env: str = "", sandbox: str = "") -> str:
    path = directory / f"{name}.toml"
    outs = f"outputs = {json.dumps(outputs)}" if outputs else ""
    path.write_text(DRV.format(name=name, script=json.dumps(script), outputs=outs, env=env, sandbox=sandbox))
    return str(path)


# name -> (builder script, expected cause kind, expected variations named)
PLANTED = {
    "time": ("date +%s%N > $out", "non-deterministic", []),
    "random": ("head -c 16 /dev/urandom > $out", "non-deterministic", []),
    "hostname": ("uname -n > $out", "variation", ["hostname"]),
    "builddir": ('echo "built in $(pwd), temporary files in $TMPDIR" > $out', "variation", ["build_dir"]),
    # No fr_FR locale needs to exist: the build reads $LANG itself (spec: what is real).
    "locale": ('echo "messages: ${LANG%%.*}" > $out', "variation", ["lang"]),
    "timezone": ('date -d "@$SOURCE_DATE_EPOCH" "+%Y-%m-%d %H:%M %Z" > $out', "variation", ["tz"]),
    # Outputs are normalised to 0444/0555, so the umask is planted through content.
    "umask": ("touch f && stat -c %a f > $out", "variation", ["umask"]),
    "cores": ('echo "make -j$FIMIO_BUILD_CORES" > $out', "variation", ["cores"]),
    "nproc": ("nproc > $out", "variation", ["cores"]),
    "dirorder": ("mkdir d && for f in a b c d e f g h i j; do : > d/$f; done && ls -U d > $out",
                 "variation", ["dir_order"]),
    "envorder": ("env | cut -d= -f1 > $out", "variation", ["env_order"]),
    "uid": ("id -u > $out", "variation", ["uid"]),
}

CONTROL = ("mkdir -p $out/share $out/bin && echo hello > $out/share/greeting && "
           "printf '%s\\n' c a b | LC_ALL=C sort > $out/share/sorted && "
           "printf '#!/bin/sh\\necho hi\\n' > $out/bin/hi && chmod +x $out/bin/hi && ln -s share/greeting $out/link")


def check_json(cli, *targets, args=("--rounds", "2", "--vary"), code=3, env=None):
    proc = cli("realise", *targets, "--no-out-link", "--check", *args, "--json", check=code, env=env)
    out = json.loads(proc.stdout)
    validate_both(out["checks"], SCHEMA)
    return out["checks"], proc


def entry(report, name):
    (e,) = [d for d in report["derivations"] if d["name"] == name]
    return e


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_cause_is_named(cli, tmp_path, name):
    if name == "nproc" and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: the CPU affinity cannot be narrowed, only FIMIO_BUILD_CORES varies")
    if name == "dirorder":
        from fimio.store.sandbox import fs_type

        if fs_type(str(tmp_path)) == "tmpfs":
            pytest.skip("the store is on a tmpfs: directory order is not varied (spec/reproducibility.md)")
    script, kind, variations = PLANTED[name]
    drv = write_drv(tmp_path, name, script)
    report, proc = check_json(cli, drv)
    assert not report["ok"]
    e = entry(report, name)
    assert e["result"] == "different"
    assert e["cause"]["kind"] == kind, e["cause"]
    assert e["cause"]["variations"] == variations, e["cause"]
    if name == "time":
        assert "current time" in e["cause"]["hint"]
    assert "fimio: error: not reproducible" in proc.stderr and 'see the "checks" report on stdout' in proc.stderr
    (out,) = e["outputs"]
    assert not out["identical"] and len(set(out["digests"])) == 2
    (check_path,) = out["checkPaths"]
    assert check_path.endswith(f"-{name}.check")
    # the kept .check path is a valid store path that fimio diff can compare
    info = json.loads(cli.out("path-info", check_path, "--json"))
    info = info[0] if isinstance(info, list) else info
    assert info["ca"] == "check"
    assert info["deriver"].endswith(f"-{name}.drv")
    diff = cli.out("diff", out["path"], check_path)
    assert "the contents differ" in diff


def test_all_planted_causes_in_one_run_report_every_output(cli, tmp_path):
    """Several targets at once: every differing derivation is reported, not just the first."""
    names = ["hostname", "uid", "timezone", "envorder"]
    drvs = [write_drv(tmp_path, n, PLANTED[n][0]) for n in names]
    drvs.append(write_drv(tmp_path, "control", CONTROL))
    report, _ = check_json(cli, *drvs)
    for n in names:
        assert entry(report, n)["cause"]["variations"] == PLANTED[n][2]
    assert entry(report, "control")["result"] == "identical"
    assert report["summary"].startswith("not reproducible: ")
    for n in names:
        assert n in report["summary"]


def test_control_is_bit_identical_in_five_varied_rounds(cli, tmp_path, store):
    drv = write_drv(tmp_path, "control", CONTROL)
    report, proc = check_json(cli, drv, args=("--rounds", "5", "--vary"), code=0)
    assert report["ok"] and report["rounds"] == 5
    e = entry(report, "control")
    assert e["result"] == "identical" and e["builds"] == 4 and len(e["rounds"]) == 5
    assert [r["source"] for r in e["rounds"]] == ["registered"] + ["build"] * 4
    assert e["rounds"][0]["varied"] == [] and set(e["rounds"][1]["varied"]) == set(report["varied"])
    assert len(set(e["outputs"][0]["digests"])) == 1
    assert e["outputs"][0]["checkPaths"] == []
    # the check is recorded against the output, for path-info
    from fimio.store.check import repro_status
    from fimio.store.paths import StorePath

    path = StorePath.parse(e["outputs"][0]["path"].rsplit("/", 1)[1])
    status = repro_status(store, path)
    assert status["checked"] == 1 and status["builds"] == 5 and status["bitIdentical"]
    assert "hostname" in status["variations"] and status["lastResult"] == "identical"


def test_text_report_reads_well(cli, tmp_path):
    drv = write_drv(tmp_path, "hostname", PLANTED["hostname"][0])
    proc = cli("realise", drv, "--no-out-link", "--check", "--vary", check=3)
    err = proc.stderr
    assert "✗ hostname: NOT reproducible" in err
    assert "cause: the output depends on the host name" in err
    assert "hostname: localhost -> fimio-vary-a" in err
    assert "-localhost" in err and "+fimio-vary-a" in err
    assert "explain: fimio diff " in err and ".check" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fimio: error: not reproducible: hostname (variation: hostname)")
    assert "see the report above" in last
    assert "Traceback" not in err


def test_without_vary_a_difference_is_non_determinism(cli, tmp_path):
    drv = write_drv(tmp_path, "time", PLANTED["time"][0])
    report, _ = check_json(cli, drv, args=())
    e = entry(report, "time")
    assert e["cause"]["kind"] == "non-deterministic"
    assert "no variation applied" in e["cause"]["text"]
    assert e["builds"] == 1 and report["varied"] == []
    # without --vary, the hostname build is reproducible
    drv = write_drv(tmp_path, "hostname", PLANTED["hostname"][0])
    report, _ = check_json(cli, drv, args=("--rounds", "3"), code=0)
    assert entry(report, "hostname")["result"] == "identical"


def test_check_of_a_valid_output_costs_one_build(cli, tmp_path):
    drv = write_drv(tmp_path, "control", CONTROL)
    cli("realise", drv, "--no-out-link", check=0)
    report, _ = check_json(cli, drv, args=(), code=0)
    e = entry(report, "control")
    assert e["builds"] == 1 and e["baseline"] == "valid before this realise"
    text = cli.out("provenance", drv)
    assert "all 2 builds agree bit for bit" in text
    assert "checks (1):" in text and "identical in 2 builds" in text
    prov = json.loads(cli.out("provenance", drv, "--json"))
    assert [r.get("purpose", "build") for r in prov["records"]] == ["build", "check"]
    assert len(prov["groups"]) == 1 and prov["groups"][0]["registered"]


def test_every_output_of_a_multi_output_derivation(cli, tmp_path):
    script = "uname -n > $out && mkdir $dev && echo stable > $dev/a && uname -n > $dev/host && echo x > $dev/$(uname -n)"
    drv = write_drv(tmp_path, "multi", script, outputs=["out", "dev"])
    report, _ = check_json(cli, drv)
    e = entry(report, "multi")
    assert e["cause"]["variations"] == ["hostname"]
    outs = {o["output"]: o for o in e["outputs"]}
    assert not outs["out"]["identical"] and not outs["dev"]["identical"]
    assert outs["dev"]["checkPaths"][0].endswith("-multi-dev.check")
    changes = {c["path"]: c for c in outs["dev"]["diffs"][0]["changes"]}
    assert changes["host"]["change"] == "changed" and changes["host"]["firstDifference"] == 0
    assert changes["localhost"]["change"] == "removed"
    assert changes["fimio-vary-a"]["change"] == "added"
    assert "a" not in changes


def test_check_paths_are_not_gc_roots(cli, tmp_path):
    drv = write_drv(tmp_path, "hostname", PLANTED["hostname"][0])
    link = tmp_path / "result"
    proc = cli("realise", drv, "--out-link", link, "--check", "--vary", "--json", check=3)
    e = entry(json.loads(proc.stdout)["checks"], "hostname")
    check_path = e["outputs"][0]["checkPaths"][0]
    roots = cli.out("roots")
    assert check_path.rsplit("/", 1)[1] not in roots
    dry = cli.out("gc", "--dry-run")
    assert check_path.rsplit("/", 1)[1] in dry
    assert e["outputs"][0]["path"].rsplit("/", 1)[1] not in dry


def test_diffoscope_is_used_when_on_path(cli, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "diffoscope"
    fake.write_text('#!/bin/sh\necho "FAKE DIFFOSCOPE $*"\nexit 1\n')
    fake.chmod(0o755)
    drv = write_drv(tmp_path, "hostname", PLANTED["hostname"][0])
    env = {"PATH": f"{bindir}:{os.environ['PATH']}"}
    proc = cli("realise", drv, "--no-out-link", "--check", "--vary", "--json", check=3, env=env)
    report = json.loads(proc.stdout)["checks"]
    validate_both(report, SCHEMA)
    d = entry(report, "hostname")["outputs"][0]["diffs"][0]
    assert d["diffoscope"].startswith("FAKE DIFFOSCOPE --text - ")
    # and absent without it
    report, _ = check_json(cli, drv)
    assert entry(report, "hostname")["outputs"][0]["diffs"][0]["diffoscope"] is None


def test_a_build_failing_under_variation_is_a_build_failure(cli, tmp_path):
    drv = write_drv(tmp_path, "picky", 'test "$(uname -n)" = localhost && echo ok > $out')
    proc = cli("realise", drv, "--no-out-link", "--check", "--vary", check=1)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fimio: error: check build (round 2, varied ")
    assert "hostname" in last and "failed with exit code 1" in last


def test_repro_status_of_a_difference(cli, tmp_path, store):
    drv = write_drv(tmp_path, "uid", PLANTED["uid"][0])
    report, _ = check_json(cli, drv)
    out = entry(report, "uid")["outputs"][0]
    from fimio.store.check import repro_status
    from fimio.store.paths import StorePath

    status = repro_status(store, StorePath.parse(out["path"].rsplit("/", 1)[1]))
    assert status["bitIdentical"] is False and status["lastResult"] == "different"
    assert status["causes"] == ["the output depends on the user id"]
    assert status["checkPaths"] == [out["checkPaths"][0].rsplit("/", 1)[1]]
    assert repro_status(store, StorePath.parse(out["checkPaths"][0].rsplit("/", 1)[1])) is None


def test_fixed_output_derivations_are_skipped(cli, tmp_path):
    import hashlib

    payload = tmp_path / "payload"
    payload.write_bytes(b"fetched bytes\n")
    (tmp_path / "fetch.toml").write_text(
        f'name = "fetched"\n[fetch]\nurl = "file://{payload}"\nhash = "sha256:{hashlib.sha256(payload.read_bytes()).hexdigest()}"\n')
    report, _ = check_json(cli, str(tmp_path / "fetch.toml"), code=0)
    e = entry(report, "fetched")
    assert e["result"] == "skipped" and "fixed-output" in e["skipped"]
    assert report["summary"] == "0 outputs bit-identical in 2 builds; 1 derivation skipped", report["summary"]


def test_fewer_than_two_rounds_is_bad_usage(cli, tmp_path):
    """A check compares builds: --rounds counts them all, the registered one included."""
    from conftest import assert_one_error_line

    drv = write_drv(tmp_path, "control", CONTROL)
    assert_one_error_line(cli("realise", drv, "--no-out-link", "--check", "--rounds", "1"), 2, "--rounds")


def test_a_check_rebuilds_inputs_a_collection_took(cli, tmp_path):
    """The output to check is valid (rooted by ./result), but the build-time inputs it was
    made from were collected: --check realises them again first, then compares."""
    from test_sandbox import write_drv as write

    write(tmp_path / "dep.toml", "dep", "echo dep > $out")
    top = write(tmp_path / "top.toml", "top", "cat $dep > $out", inputs={"dep": {"drv": "dep.toml"}})
    work = tmp_path / "work"
    work.mkdir()
    cli("realise", top, cwd=work, check=0)
    deleted = json.loads(cli.out("gc", "--json"))["deleted"]
    assert any(d["path"].endswith("-dep") for d in deleted)  # the input's output went
    report, _ = check_json(cli, top, args=("--rounds", "2"), code=0)
    assert report["ok"] and entry(report, "top")["result"] == "identical"


def test_a_kept_check_build_never_leaves_the_store(cli, tmp_path):
    from conftest import assert_one_error_line

    drv = write_drv(tmp_path, "random", PLANTED["random"][0])
    report, _ = check_json(cli, drv, code=3)
    (check_path,) = [p for e in report["derivations"] for o in e["outputs"] for p in o["checkPaths"]]
    for args in (["push", f"file://{tmp_path / 'cache'}", check_path], ["export", check_path, "-o", tmp_path / "b"]):
        assert_one_error_line(cli(*args), 2, "kept --check build")
    assert not (tmp_path / "b").exists()


def test_a_build_that_only_sometimes_differs_is_never_blamed_on_a_variation(cli, tmp_path):
    """The build prints what it reads from a FIFO the test feeds: the registered build and
    every build after round 2 read "A", round 2 and the first bisection build to read read
    "B". Without confirmation, that one variation would be named as the cause."""
    import threading

    feed = tmp_path / "feed"
    feed.mkdir()
    fifo = feed / "fifo"
    os.mkfifo(fifo)
    keep_open = os.open(fifo, os.O_RDWR)  # the pipe lives (and readers block) while the test runs
    script = f"dd if={fifo} bs=1 count=1 2>/dev/null > $out"
    drv = write_drv(tmp_path, "sometimes", script, sandbox=f'[sandbox]\nhost_paths = ["/usr", "/bin", "/lib", "/lib64", "{feed}"]')
    try:
        os.write(keep_open, b"A")
        cli("realise", drv, "--no-out-link", check=0)
        # round 2 (varied), control, the bisection builds (one of them B), then enough for the rest
        os.write(keep_open, b"B" + b"A" + b"B" + b"A" * 40)
        report, _ = check_json(cli, drv)
    finally:
        threading.Thread(target=os.close, args=(keep_open,), daemon=True).start()
    e = entry(report, "sometimes")
    assert e["cause"]["kind"] == "non-deterministic", e["cause"]
    assert "only sometimes differs" in e["cause"]["text"]
    assert e["cause"]["variations"] == []


def test_a_clock_in_whole_seconds_is_not_blamed_on_the_host(cli, tmp_path):
    """Rebuilds made within one second agree with each other and differ from the output
    registered earlier; a control built a second later shows the build is not deterministic."""
    import time

    drv = write_drv(tmp_path, "seconds", "date -u +%s > $out")
    cli("realise", drv, "--no-out-link", check=0)
    time.sleep(1.2)
    report, _ = check_json(cli, drv)
    cause = entry(report, "seconds")["cause"]
    assert cause["kind"] == "non-deterministic", cause
    assert "current time" in cause["hint"]


def test_a_change_of_the_configured_cores_is_named(cli, tmp_path):
    drv = write_drv(tmp_path, "cores", PLANTED["cores"][0])
    cli("realise", drv, "--no-out-link", check=0)
    config = tmp_path / "config.toml"
    config.write_text(f"cores = {(os.cpu_count() or 1) + 1}\n")
    report, _ = check_json(cli, drv, args=(), env={"FIMIO_CONFIG": str(config)})
    cause = entry(report, "cores")["cause"]
    assert cause["kind"] == "host-changed" and "build cores" in cause["text"], cause


def test_a_failed_check_round_keeps_the_log_of_the_registered_build(cli, tmp_path):
    drv = write_drv(tmp_path, "picky", 'echo "building on $(uname -n)"; test "$(uname -n)" = localhost && echo ok > $out')
    cli("realise", drv, "--no-out-link", check=0)
    before = cli.out("log", drv)
    assert "building on localhost" in before
    cli("realise", drv, "--no-out-link", "--check", "--vary", check=1)
    assert cli.out("log", drv) == before


def test_path_info_names_the_cause_of_a_difference(cli, tmp_path):
    drv = write_drv(tmp_path, "hostname", PLANTED["hostname"][0])
    out = cli.out("realise", drv, "--no-out-link")
    cli("realise", drv, "--no-out-link", "--check", "--vary", check=3)
    line = cli.out("path-info", out)
    assert line.endswith("checked 1x: NOT reproducible (the output depends on the host name)"), line


def test_keep_going_checks_every_target_it_could_build_and_exits_with_the_gravest(cli, tmp_path):
    """-k with --check: a failed build, or a failed check round, stops only its own target;
    the others are still checked, and the exit code is the gravest (3 over 1)."""
    bad = write_drv(tmp_path, "bad", "echo broken >&2; exit 3")
    random = write_drv(tmp_path, "random", PLANTED["random"][0])
    same = write_drv(tmp_path, "same", "echo same > $out")
    proc = cli("realise", "--no-out-link", "--check", "-k", bad, random, same)
    assert proc.returncode == 3, proc.stderr
    assert "✗ random: NOT reproducible" in proc.stderr and "✓ same: bit-identical" in proc.stderr
    last = proc.stderr.splitlines()[-1]
    assert last.startswith("fimio: error: 2 failure(s)"), proc.stderr
    assert "-bad.drv' failed with exit code 3" in proc.stderr and "  > broken" in proc.stderr
    # a check round that fails (TZ varied) stops only its own target
    zone = write_drv(tmp_path, "zone", '[ "$TZ" = UTC ] || { echo wrong zone >&2; exit 9; }; echo ok > $out')
    proc = cli("realise", "--no-out-link", "--check", "--vary", "-k", zone, random, same)
    assert proc.returncode == 3, proc.stderr
    assert "✗ random: NOT reproducible" in proc.stderr and "✓ same: bit-identical" in proc.stderr
    assert "check build (round 2" in proc.stderr and "  > wrong zone" in proc.stderr
    assert "✗ check not done: check build (round 2" in proc.stderr
    out = json.loads(cli("realise", "--no-out-link", "--check", "--vary", "-k", "--json", zone, same, check=1).stdout)
    validate_both(out["checks"], SCHEMA)
    assert out["checks"]["ok"] is False and len(out["checks"]["failures"]) == 1
    assert "round 2" in out["checks"]["failures"][0] and [d["name"] for d in out["checks"]["derivations"]] == ["same"]
    # without -k the first failure stops the command
    proc = cli("realise", "--no-out-link", "--check", "--vary", zone, random)
    assert proc.returncode == 1 and "(a check build's log is not kept" in proc.stderr.splitlines()[-1], proc.stderr


def test_keep_going_goes_on_when_a_check_cannot_have_its_inputs_again(cli, tmp_path):
    """A check rebuild needs its inputs again: one that cannot be had (a fetch whose source
    is gone, its output collected) stops only that target's check, as any failure does."""
    data = tmp_path / "data.txt"
    data.write_text("data\n")
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    (tmp_path / "fod.toml").write_text(f'name = "data.txt"\n[fetch]\nurl = "file://{data}"\nhash = "sha256:{digest}"\n')
    (tmp_path / "t.toml").write_text('name = "t"\nbuilder = "/bin/sh"\nargs = ["-c", "read x < $dat; echo $x > $out"]\n'
                                      '[inputs]\ndat = { drv = "fod.toml" }\n')
    random = write_drv(tmp_path, "random", PLANTED["random"][0])
    cli.out("realise", "-o", tmp_path / "result", tmp_path / "t.toml")
    data.unlink()
    cli.out("gc")  # the fetched input goes; t's output stays, rooted
    proc = cli("realise", "--no-out-link", "--check", "-k", tmp_path / "t.toml", random)
    assert proc.returncode == 3, proc.stderr
    assert "✗ random: NOT reproducible" in proc.stderr and "✗ check not done: cannot fetch" in proc.stderr


def test_quiet_shows_a_check_report_only_when_it_found_a_difference(cli, tmp_path):
    same = write_drv(tmp_path, "hostname", PLANTED["hostname"][0])
    proc = cli("realise", "--no-out-link", "--check", "-q", same)
    assert (proc.returncode, proc.stderr) == (0, "")
    differs = write_drv(tmp_path, "time", PLANTED["time"][0])
    proc = cli("realise", "--no-out-link", "--check", "-q", differs)
    assert proc.returncode == 3 and "non-deterministic" in proc.stderr
