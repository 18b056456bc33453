"""The terminal status line (cli/progress.py), driven directly with stderr captured."""

from __future__ import annotations

import sys
import types

import pytest

from fimio.cli import progress


@pytest.fixture
def screen(monkeypatch, capsys):
    """stderr as a 60-column terminal; ``screen()`` is what was written to it."""
    monkeypatch.setattr(progress, "_terminal_width", lambda opts: 60)
    return lambda: capsys.readouterr().err


OPTS = types.SimpleNamespace(verbosity=0)


def test_a_bar_is_drawn_in_place_fits_the_terminal_and_is_erased(screen):
    bar = progress.ByteProgress(OPTS, "pushing to file:///a/very/long/path/of/some/cache/directory")
    bar(3 << 20, 12 << 20)
    bar(6 << 20, 12 << 20)  # within the redraw interval: not drawn
    bar.done()
    bar(9 << 20, 12 << 20)  # a late report after done: not drawn
    drawn = screen().split("\r\x1b[K")
    assert drawn[0] == "" and drawn[-1] == ""  # each drawing clears the line; the last is the erase
    assert len(drawn) == 3
    line = drawn[1]
    assert len(line) <= 59 and line.startswith("pushin… [")  # the label gives way to the bar
    assert line.endswith("]  25% 3.0 MiB / 12.0 MiB")


def test_a_message_goes_above_the_bar_which_comes_back_at_its_next_update(screen):
    bar = progress.ByteProgress(OPTS, "copying")
    bar(1 << 20, None)
    progress.say("warning: cache X refused a path; building instead")
    bar(2 << 20, None)  # drawn at once: the message made room for it
    bar.done()
    progress.say("copied 1 path")
    assert screen() == ("\r\x1b[Kcopying 1.0 MiB" "\r\x1b[K" "warning: cache X refused a path; building instead\n"
                                   "\r\x1b[Kcopying 2.0 MiB" "\r\x1b[K" "copied 1 path\n")


def test_nothing_is_drawn_off_a_terminal_or_with_q(capsys):
    for opts in (OPTS, types.SimpleNamespace(verbosity=-1)):
        bar = progress.ByteProgress(opts, "adding")
        assert bar.callback is None
        bar(1, 2)
        bar.done()
    assert capsys.readouterr().err == ""


def test_a_failing_terminal_turns_the_line_off(monkeypatch, screen):
    bar = progress.ByteProgress(OPTS, "importing")

    def broken(text):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(sys.stderr, "write", broken)
    bar(1, 2)  # no error escapes into the work that reported
    assert not bar.enabled
