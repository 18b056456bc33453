"""The store of an unprivileged user: every writer works without root's bypass of file
permissions. Run as root, the commands run under ``setpriv`` without the capabilities that
bypass them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER), so root meets the same
checks: moving a read-only directory to another parent, for one, needs write permission on
the directory itself."""

from __future__ import annotations

import os
import shutil

import pytest

from cachefixtures import make_keys, write_config
from conftest import run_fimio
from test_sandbox import EXAMPLES

_CAPS = "-dac_override,-dac_read_search,-fowner"


@pytest.fixture
def as_owner(tmp_path):
    """``run(root_name, *args)``: fimio as an unprivileged owner of the store."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv is not installed: cannot drop root's permission bypass")
    prefix = ["setpriv", "--bounding-set", _CAPS, "--inh-caps", _CAPS] if os.geteuid() == 0 else []
    sk, pk = make_keys("owner-1")
    (tmp_path / "sk").write_text(str(sk) + "\n")
    config = write_config(tmp_path / "config.toml", trusted=[pk], secret_key_files=[tmp_path / "sk"])

    def run(root: str, *args, check=0):
        proc = run_fimio(list(args), tmp_path / root, env={"FIMIO_CONFIG": config}, prefix=prefix, check=check)
        return proc.stdout if check == 0 else proc

    return run


def test_every_writer_works_without_the_permission_bypass(as_owner, tmp_path):
    src = tmp_path / "src" / "sub"
    src.mkdir(parents=True)
    (src / "f").write_text("f\n")
    hello = EXAMPLES / "hello" / "hello.toml"
    cache, bundle = f"file://{tmp_path / 'cache'}", tmp_path / "hello.bundle"

    secret = tmp_path / "secret.toml"  # a mode-000 output file is still its owner's to read
    secret.write_text('name = "secret"\nbuilder = "/bin/sh"\nargs = ["-c", "echo s > $out; chmod 000 $out"]\n'
                      '[env]\nPATH = "/usr/bin:/bin"\n')
    assert open(as_owner("a", "realise", "--no-out-link", secret).strip()).read() == "s\n"
    added = as_owner("a", "add", tmp_path / "src").strip()
    built = as_owner("a", "realise", "--no-out-link", hello).strip()  # a directory output
    assert os.path.isdir(added) and os.path.isfile(os.path.join(built, "bin", "hello"))
    as_owner("a", "push", cache, hello)
    substituted = as_owner("b", "realise", "--no-out-link", "--substituter", cache, hello).strip()
    as_owner("a", "export", "--closure", hello, "-o", bundle)
    imported = as_owner("c", "import", bundle)
    assert os.path.basename(substituted) == os.path.basename(built) and os.path.basename(built) in imported

    victim = os.path.join(substituted, "bin", "hello")  # damage it, as root could
    os.chmod(victim, 0o644)
    with open(victim, "ab") as f:
        f.write(b"damage")
    as_owner("b", "verify", "--check-contents", "--repair", "--substituter", cache)
    assert run_fimio(["verify", "--check-contents"], tmp_path / "b").returncode == 0
    as_owner("a", "gc")
    assert not os.path.exists(added) and not os.path.exists(built)


def test_an_out_link_gc_cannot_read_stops_gc_and_keeps_what_it_roots(as_owner, tmp_path):
    """An unreadable out-link is not a gone one: its registration stays, and gc refuses
    rather than collect what the link may root."""
    f = tmp_path / "u.toml"
    f.write_text('name = "u"\nbuilder = "/bin/sh"\nargs = ["-c", "echo u > $out"]\n')
    (tmp_path / "links").mkdir()
    out = as_owner("a", "realise", f, "-o", tmp_path / "links" / "u").strip()
    os.chmod(tmp_path / "links", 0)
    try:
        proc = as_owner("a", "gc", check=None)
    finally:
        os.chmod(tmp_path / "links", 0o755)
    assert proc.returncode == 2 and "cannot read the out-link" in proc.stderr, proc.stderr
    as_owner("a", "gc")
    assert open(tmp_path / "links" / "u").read() == "u\n" and os.path.exists(out)
