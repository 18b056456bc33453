"""``fimio diff`` (derivations, outputs, build records) and ``fimio provenance``, through the CLI."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fimio.store import treediff

SH = 'builder = "/bin/sh"\n[env]\nPATH = "/usr/bin:/bin"\n'


def graph(root: pathlib.Path, greeting: str, extra_env: str = "") -> pathlib.Path:
    """app -> lib -> base -> src/ (hello.txt, other.txt): a source change three levels down."""
    root.mkdir(parents=True)
    (root / "src").mkdir()
    (root / "src" / "hello.txt").write_text(f"line one\n{greeting}\nline three\n")
    (root / "src" / "other.txt").write_text("unchanged\n")
    (root / "base.toml").write_text(
        'name = "base"\nargs = ["-c", "cat $src/hello.txt > $out"]\n' + SH + '[inputs]\nsrc = { path = "src" }\n')
    (root / "lib.toml").write_text(
        'name = "lib"\nargs = ["-c", "cat $base > $out"]\n' + SH + extra_env + '[inputs]\nbase = { drv = "base.toml" }\n')
    (root / "app.toml").write_text(
        'name = "app"\nargs = ["-c", "cat $lib > $out"]\n' + SH + '[inputs]\nlib = { drv = "lib.toml" }\n')
    return root


def test_source_change_three_levels_down_is_named_with_its_chain(cli, tmp_path):
    a = graph(tmp_path / "v1", "hello")
    b = graph(tmp_path / "v2", "hello, world")
    text = cli.out("diff", a / "app.toml", b / "app.toml")
    assert "• input 'lib' (derivation 'lib', output 'out') differs" in text
    assert "  • input 'base' (derivation 'base', output 'out') differs" in text
    assert "    • source 'src' differs" in text
    assert "      • hello.txt: contents differ (26 vs 33 bytes, first difference at byte 14)" in text
    assert "-hello" in text and "+hello, world" in text
    assert "other.txt" not in text
    assert "why:\n  input 'lib' (lib) -> input 'base' (base) -> source 'src' -> hello.txt" in text
    data = json.loads(cli.out("diff", a / "app.toml", b / "app.toml", "--json"))
    assert data["identical"] is False
    assert data["chains"] == ["input 'lib' (lib) -> input 'base' (base) -> source 'src' -> hello.txt"]
    (lib,) = data["findings"]
    assert lib["kind"] == "input" and lib["children"][0]["kind"] == "input"


def test_identical_derivations(cli, tmp_path):
    a = graph(tmp_path / "v1", "hello")
    b = graph(tmp_path / "v2", "hello")
    text = cli.out("diff", a / "app.toml", b / "app.toml")
    assert text.splitlines()[-1] == "identical derivations"
    drv = cli.out("instantiate", a / "app.toml")
    assert cli.out("diff", drv, b / "app.toml").endswith("identical derivations")
    data = json.loads(cli.out("diff", drv, drv, "--json"))
    assert data["identical"] and data["findings"] == [] and data["chains"] == []
    assert data["a"]["physical"] == drv and data["a"]["path"].startswith("/fimio/store/")


def test_env_args_builder_and_host_paths(cli, tmp_path):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text('name = "x"\nbuilder = "/bin/sh"\nargs = ["-c", "echo one\\necho two > $out"]\n'
                 '[env]\nPATH = "/usr/bin:/bin"\nMODE = "fast"\nOLD = "1"\n')
    b.write_text('name = "x"\nbuilder = "/usr/bin/dash"\nargs = ["-c", "echo one\\necho 2 > $out"]\n'
                 '[env]\nPATH = "/usr/bin:/bin"\nMODE = "slow"\nNEW = "1"\n'
                 '[sandbox]\nhost_paths = ["/usr", "/bin", "/lib", "/lib64", "/opt"]\n')
    text = cli.out("diff", a, b)
    assert "• the builder differs: '/bin/sh' vs '/usr/bin/dash'" in text
    assert "• the builder arguments differ" in text and "-[1] echo two > $out" in text and "+[1] echo 2 > $out" in text
    assert "• environment variable MODE differs: 'fast' vs 'slow'" in text
    assert "• environment variable OLD only in A" in text and "• environment variable NEW only in B" in text
    assert "• the sandbox host paths differ" in text and "only in B: /opt" in text


def test_host_path_change_between_two_builds_is_named(cli, tmp_path):
    tool = tmp_path / "tool"
    tool.mkdir()
    (tool / "version").write_text("tool 1.0\n")
    drv = tmp_path / "t.toml"
    drv.write_text('name = "uses-tool"\nbuilder = "/bin/sh"\nargs = ["-c", "cat $TOOLDIR/version > $out"]\n'
                   f'[env]\nPATH = "/usr/bin:/bin"\nTOOLDIR = "{tool}"\n'
                   f'[sandbox]\nhost_paths = ["/usr", "/bin", "/lib", "/lib64", "{tool}"]\n')
    out = cli.out("realise", drv, "--no-out-link")
    (tool / "version").write_text("tool 1.1\n")
    proc = cli("realise", drv, "--no-out-link", "--check", "--json", check=3)
    e = json.loads(proc.stdout)["checks"]["derivations"][0]
    assert e["cause"]["kind"] == "host-changed" and f"host path {tool}" in e["cause"]["text"]
    hp = pathlib.Path(cli.out("instantiate", drv)).name.split("-")[0]
    text = cli.out("diff", f"{hp}@1", f"{hp}@2")
    assert f"• host path {tool} changed: tree blake3:" in text
    assert "-tool 1.0" in text and "+tool 1.1" in text
    assert f"  host path {tool}" in text.split("why")[1]
    # the output and its .check: the files, and the builds behind them
    check_path = e["outputs"][0]["checkPaths"][0]
    text = cli.out("diff", out, check_path)
    assert "• the contents differ: 1 file" in text
    assert f"  • host path {tool} changed" in text
    # @3 is the control build, @4 the delayed one that confirmed the cause; @-1 is the newest record;
    # out-of-range ids are "not found"
    assert cli.out("diff", f"{hp}@2", f"{hp}@-1").endswith("identical records")
    proc = cli("diff", f"{hp}@1", f"{hp}@9")
    assert proc.returncode == 5 and "there are builds @1 to @4" in proc.stderr


def test_provenance_lists_builds_and_agreement(cli, tmp_path):
    drv = tmp_path / "h.toml"
    drv.write_text('name = "h"\nbuilder = "/bin/sh"\nargs = ["-c", "uname -n > $out"]\n[env]\nPATH = "/usr/bin:/bin"\n')
    cli("realise", drv, "--no-out-link", "--check", "--vary", check=3)
    text = cli.out("provenance", drv)
    assert "builds (15):" in text  # 1 + check + control + 10 bisections + confirmation + control
    assert "@2   check" in text and "kept " in text and "@7   bisect hostname" in text
    assert "[A] out " in text and "(the registered output)" in text and "[B] out " in text
    assert "cause: the output depends on the host name" in text
    data = json.loads(cli.out("provenance", drv, "--json"))
    groups = {tuple(g["records"]) for g in data["groups"]}
    hp = data["drv"].rsplit("/", 1)[1].split("-")[0]
    assert (f"{hp}@2", f"{hp}@7", f"{hp}@14") in groups  # @14 confirms @7
    assert data["records"][0]["id"] == f"{hp}@1" and "fingerprints" in data["records"][0]


def test_operands_must_be_of_one_sort(cli, tmp_path):
    a = graph(tmp_path / "v1", "hello")
    out = cli.out("realise", a / "base.toml", "--no-out-link")
    proc = cli("diff", a / "base.toml", out)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fimio: error: cannot compare a derivation with an output")
    assert cli("diff", out, "/fimio/store/00000000000000000000000000000000-nope").returncode == 5


def _tree(root: pathlib.Path, files: int, per_dir: int = 100) -> None:
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(parents=True)
        (d / f"f{i:06d}.txt").write_text(f"file {i}\n")


def _outputs_differing_in_ten(cli, tmp_path, files: int):
    a, b = tmp_path / "a", tmp_path / "b"
    _tree(a, files)
    shutil.copytree(a, b, symlinks=True)
    (b / "d0000" / "f000000.txt").write_text("file 0 changed\n")
    for i in (1234, 2345):
        (b / f"d{i // 100:04d}" / f"f{i:06d}.txt").write_text(f"file {i} changed\n")
    os.unlink(b / "d0001" / "f000100.txt")
    (b / "d0002" / "new.txt").write_text("new\n")
    os.chmod(b / "d0003" / "f000300.txt", 0o755)
    (b / "d0004" / "f000400.txt").unlink()
    os.symlink("f000401.txt", b / "d0004" / "f000400.txt")
    (b / "d0005" / "extra").mkdir()
    (b / "d0005" / "extra" / "x").write_text("x\n")
    shutil.rmtree(b / "d0006")
    (b / "d0007" / "f000700.txt").write_bytes(b"\0binary\0")
    pa, pb = cli.out("add", a), cli.out("add", b)
    return pa, pb


def test_output_file_comparison(cli, tmp_path):
    pa, pb = _outputs_differing_in_ten(cli, tmp_path, 3000)
    data = json.loads(cli.out("diff", pa, pb, "--json"))
    assert (data["a"]["physical"], data["b"]["physical"]) == (pa, pb)  # both names, as every --json gives
    files = data["findings"][0]
    assert files["kind"] == "files"
    labels = {c["label"]: c["what"] for c in files["children"]}
    assert labels["d0000/f000000.txt"].endswith("contents differ (7 vs 15 bytes, first difference at byte 6)")
    assert labels["d0001/f000100.txt"] == "d0001/f000100.txt: only in A (file, 9 bytes)"
    assert labels["d0002/new.txt"] == "d0002/new.txt: only in B (file, 4 bytes)"
    assert "executable in B" in labels["d0003/f000300.txt"]
    assert labels["d0004/f000400.txt"] == "d0004/f000400.txt: a file in A, a symlink in B"
    assert labels["d0005/extra"] == "d0005/extra: only in B (directory, 1 files, 2 bytes)"
    assert labels["d0006"].startswith("d0006: only in A (directory, 100 files,")
    assert "d0007/f000700.txt" in labels and len(labels) == 10
    text = cli.out("diff", pa, pb)
    assert "(binary: no text diff)" in text and "+file 1234 changed" in text


@pytest.mark.slow
def test_diff_of_two_50k_file_outputs_takes_under_2s(cli, tmp_path):
    pa, pb = _outputs_differing_in_ten(cli, tmp_path, 50_000)
    t0 = time.perf_counter()
    text = cli.out("diff", pa, pb)
    elapsed = time.perf_counter() - t0
    assert "the contents differ: 10 files" in text
    assert elapsed < 2.0, elapsed


def test_names_with_control_characters_or_invalid_utf8_stay_on_one_line(cli, tmp_path):
    """A file name holding a newline or bytes that are not UTF-8 is shown quoted, C-style,
    so each change stays one line of the report (as `ls --quoting-style=c` shows it)."""
    trees = []
    for side, content in (("a", "1\n"), ("b", "2\n")):
        d = tmp_path / side
        d.mkdir()
        for name in (b"line\nbreak", b"caf\xe9", b'plain "quoted" \\ name', b"tab\there", b'"q'):
            with open(os.path.join(os.fsencode(d), name), "w") as f:
                f.write(content)
        if side == "a":
            os.symlink("x\ny", d / "link")
        trees.append(cli.out("add", d).strip())
    text = cli.out("diff", *trees)
    assert '  • link: only in A (symlink, -> "x\\ny")\n' in text, text
    heads = [line for line in text.splitlines() if ": contents differ (" in line]
    assert len(heads) == 5, text
    shown = sorted(line.strip().lstrip("• ").split(": contents differ")[0] for line in heads)
    assert shown == sorted(['"line\\nbreak"', '"caf\\xe9"', 'plain "quoted" \\ name', '"tab\\there"', '"\\"q"']), shown
    assert '--- "a/line\\nbreak"' in text and '--- "a/\\"q"' in text, text


def _unquote(text: str) -> bytes:
    """The bytes a quoted name of ``treediff.shown`` stands for (the inverse of its escapes)."""
    singles = {"n": b"\n", "t": b"\t", "r": b"\r", '"': b'"', "\\": b"\\"}
    out, i = bytearray(), 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out += ch.encode()
            i += 1
            continue
        kind = text[i + 1]
        if kind in singles:
            out += singles[kind]
            i += 2
        else:
            width = {"x": 2, "u": 4, "U": 8}[kind]
            code = int(text[i + 2:i + 2 + width], 16)
            out += bytes([code]) if kind == "x" else chr(code).encode()
            i += 2 + width
    return bytes(out)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(min_size=1, max_size=24), st.text(min_size=1, max_size=24).map(str.encode)))
def test_shown_names_are_one_printable_line_and_name_their_bytes(raw):
    text = treediff.shown(os.fsdecode(raw))
    assert text.isprintable()
    if text == os.fsdecode(raw):
        assert not text.startswith('"')
    else:
        assert text[0] == text[-1] == '"' and _unquote(text[1:-1]) == raw
