"""Options across commands: conflicting or meaningless combinations are refused (exit 2),
odd roots and caches get the right exit code, and nothing of fimio leaks into what it runs."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import assert_one_error_line, fimio_env, fimio_executable
from test_sandbox import write_drv


@pytest.mark.parametrize("args, needle", [
    (["hash", "--type", "sha256", "."], "--type needs --flat"),
    (["realise", "--no-substitute", "--substituter", "file:///c", "x.toml"], "--no-substitute and --substituter"),
    (["realise", "--rounds", "2", "--dry-run", "x.toml"], "--dry-run and --check (or --rounds, --vary)"),
    (["serve", "--cache", "file:///c", "--max-upload", "-5"], "--max-upload"),
    (["serve", "--cache", "file:///c", "--anonymous-read"], "--anonymous-read needs --tokens"),
    (["--root", "", "roots"], "--root needs a directory"),
])
def test_conflicting_or_meaningless_options_are_refused(cli, tmp_path, args, needle):
    assert_one_error_line(cli(*args, cwd=tmp_path), 2, needle)


def test_realise_json_prints_its_object_for_a_usage_error_too(cli, tmp_path):
    f = write_drv(tmp_path / "x.toml", "x", "echo x > $out")
    for args in (["--no-substitute", "--substituter", "file:///c"], ["--substituter", "bogus://x"]):
        proc = cli("realise", "--json", "--no-out-link", *args, f)
        assert proc.returncode == 2
        result = json.loads(proc.stdout)
        assert result["ok"] is False and result["error"]["exitCode"] == 2 and result["built"] == []


@pytest.mark.parametrize("kind", ["null-device", "file", "under-proc"])
def test_a_root_that_cannot_be_a_directory_is_bad_usage(cli, tmp_path, kind):
    (tmp_path / "f").write_text("f\n")
    root = {"null-device": os.devnull, "file": str(tmp_path / "f"), "under-proc": "/proc/no-such-fimio-root"}[kind]
    assert_one_error_line(cli("--root", root, "add", tmp_path / "f"), 2, f"cannot create the store at '{root}'")


def test_a_relative_xdg_data_home_is_ignored(tmp_path):
    """The XDG spec: relative values are invalid and must be ignored."""
    env = fimio_env(tmp_path, {"XDG_DATA_HOME": "relative/x", "HOME": tmp_path})
    del env["FIMIO_ROOT"]
    proc = subprocess.run([fimio_executable(), "roots"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 5 and f"'{tmp_path}/.local/share/fimio'" in proc.stderr, proc.stderr
    assert not (tmp_path / "relative").exists()


def test_the_key_group_takes_the_global_options(cli):
    assert cli.out("key", "-q", "generate", "team-1").startswith("team-1:")


def test_a_bad_secret_key_file_is_named_and_its_contents_never_shown(cli, tmp_path):
    (tmp_path / "f.txt").write_text("f\n")
    path = cli.out("add", tmp_path / "f.txt")
    secret = "team-1:9Hr6UsecretSECRETsecret"
    (tmp_path / "bad.sk").write_text(secret + "\n")
    line = assert_one_error_line(cli("push", f"file://{tmp_path / 'cache'}", path, "--key", tmp_path / "bad.sk"), 2,
                                 f"secret key file '{tmp_path / 'bad.sk'}'", "invalid secret key 'team-1'")
    assert "9Hr6U" not in line


def test_copy_from_a_cache_that_is_not_there_is_exit_6(cli, tmp_path):
    assert_one_error_line(cli("copy", "--from", f"file://{tmp_path / 'gone'}", "a" * 32), 6, "does not exist")


def test_a_read_only_server_of_a_missing_directory_refuses_to_start(cli, tmp_path):
    gone = tmp_path / "gone" / "cache"
    assert_one_error_line(cli("serve", "--cache", f"file://{gone}", "--listen", "127.0.0.1:0", timeout=30), 6,
                          "does not exist")
    assert not (tmp_path / "gone").exists()


def test_fimio_run_leaks_no_descriptor_of_the_store_into_the_command(cli, tmp_path):
    (tmp_path / "f.txt").write_text("f\n")
    path = cli.out("add", tmp_path / "f.txt")
    fds = cli.out("run", path, "--", "sh", "-c", "ls -l /proc/self/fd/")
    assert "mdb" not in fds and str(cli.root) not in fds, fds


def test_a_path_of_another_store_is_not_in_this_store(cli, tmp_path):
    """An out-link made with another root names a path of that store: "not in the store"
    (exit 5) for push and export as for path-info, not a broken derivation file."""
    (tmp_path / "f.txt").write_text("f\n")
    cli.out("add", tmp_path / "f.txt")  # this store exists
    other = subprocess.run([fimio_executable(), "add", tmp_path / "f.txt"], env=fimio_env(tmp_path / "other"),
                           capture_output=True, text=True, check=True).stdout.strip()
    for args in (["push", f"file://{tmp_path / 'c'}", other], ["export", other, "-o", tmp_path / "b"],
                 ["path-info", other]):
        proc = cli(*args)
        assert proc.returncode == 5 and "is not in the store" in proc.stderr, (args, proc.stderr)


def test_fimio_run_with_a_store_directory_the_host_lacks_creates_nothing_there(cli, tmp_path):
    """bwrap cannot make /<store dir> on the host for an ordinary user (and should not for
    root): the view is rebuilt instead, and the command still sees the host and the store."""
    store_dir = f"/fimio-run-test-{os.getpid()}/store"
    (tmp_path / "f.txt").write_text("f\n")
    env = {"FIMIO_STORE_DIR": store_dir}
    path = cli.out("add", tmp_path / "f.txt", env=env)
    logical = f"{store_dir}/{os.path.basename(path)}"
    seen = cli.out("run", path, "--", "sh", "-c", f'cat {logical}; ls {tmp_path}; pwd', env=env, cwd=tmp_path)
    assert seen.split("\n") == ["f", "f.txt", "root", str(tmp_path)]
    assert not os.path.exists(os.path.dirname(store_dir))


def test_a_derivation_file_inside_another_stores_path_is_a_derivation_file(cli, tmp_path):
    checkout = tmp_path / "nix" / "store" / "0123456789abcdfghijklmnpqrsvwxyz-source"
    f = write_drv(checkout / "e.toml", "e", "echo e > $out")
    assert open(cli.out("realise", "--no-out-link", f)).read() == "e\n"
