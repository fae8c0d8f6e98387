"""Typo'd commands, actions and flags: one line that says what was meant, exit code 2."""

from __future__ import annotations

import pytest

from redpool import cli
from redpool.cliparser import closest


def fails(capsys, *argv: str) -> list[str]:
    """The lines `redpool ARGV` printed on stderr, having exited with code 2."""
    with pytest.raises(SystemExit) as exit:
        cli.main(list(argv))
    assert exit.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    return err.splitlines()


@pytest.mark.parametrize("argv, line", [
    (["wroker"], "redpool: unknown command 'wroker' (did you mean 'worker'?)"),
    (["stauts"], "redpool: unknown command 'stauts' (did you mean 'status'?)"),
    (["enque", "t.add"], "redpool: unknown command 'enque' (did you mean 'enqueue'?)"),
    (["worker", "m", "--concurency", "4"],
     "redpool worker: unknown option '--concurency' (did you mean '--concurrency'?)"),
    (["dev", "m", "--relaod"], "redpool dev: unknown option '--relaod' (did you mean '--reload'?)"),
    (["worker", "m", "--concurency=4"],
     "redpool worker: unknown option '--concurency' (did you mean '--concurrency'?)"),
    (["dead", "reque", "x"], "redpool dead: unknown action 'reque' (did you mean 'requeue'?)"),
    (["dead", "purge", "--older-then", "7d"],
     "redpool dead purge: unknown option '--older-then' (did you mean '--older-than'?)"),
    (["dead", "list", "--limt", "3"],
     "redpool dead list: unknown option '--limt' (did you mean '--limit'?)"),
    (["enqueue", "t.add", "1", "--wiat"],
     "redpool enqueue: unknown option '--wiat' (did you mean '--wait'?)"),
    (["enqueue", "t.add", "--job-timout", "3"],
     "redpool enqueue: unknown option '--job-timout' (did you mean '--job-timeout'?)"),
    (["status", "--wacth"], "redpool status: unknown option '--wacth' (did you mean '--watch'?)"),
    (["inspect", "j1", "--jsno"], "redpool inspect: unknown option '--jsno' (did you mean '--json'?)"),
    (["acl", "producr"], "redpool acl: invalid role 'producr' (did you mean 'producer'?)"),
])
def test_a_typo_gets_one_line_with_what_was_meant(capsys, argv, line):
    assert fails(capsys, *argv) == [line]


def test_a_name_close_to_nothing_lists_what_there_is(capsys):
    [line] = fails(capsys, "frobnicate")
    assert line == ("redpool: unknown command 'frobnicate' (commands: worker, dev, demo, "
                    "enqueue, dead, acl, status, inspect)")
    [line] = fails(capsys, "status", "--xyz")
    assert line == "redpool status: unknown option '--xyz' ('redpool status --help' lists them)"
    [line] = fails(capsys, "status", "extra")
    assert line.startswith("redpool status: unexpected argument 'extra'")


def test_argparses_own_errors_show_the_usage_once_then_one_line(capsys):
    lines = fails(capsys, "dead", "list", "--limit", "many")
    assert sum(line.startswith("usage:") for line in lines) == 1
    assert lines[-1].startswith("redpool dead list: argument --limit")
    lines = fails(capsys, "enqueue")
    assert lines[-1] == "redpool enqueue: the following arguments are required: TASK"


def test_hidden_flags_are_never_suggested():
    # enqueue keeps a hidden --timeout only to refuse it with a message of its own
    assert closest("--timeot", ["--timeout"]) == "--timeout"
    parser = cli.build_parser()
    enqueue = parser._subparsers._group_actions[0].choices["enqueue"]
    assert "'--timeout'" not in enqueue.unknown(["--timeot"])


def test_leading_dashes_do_not_make_everything_look_alike():
    assert closest("--xyz", ["--id", "--queue"]) is None
    assert closest("-concurrency", ["--concurrency"]) == "--concurrency"
