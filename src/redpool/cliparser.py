"""The command line's parser: argparse, with errors of one line that say what was meant.

Python 3.11's argparse has no ``suggest_on_error`` (3.14 adds one, for choices only),
and its own errors are two lines of usage and a message that names the top-level
parser even for a subcommand's flag (``redpool: error: unrecognized arguments:
--concurency 4``).  Two places change here:

* ``_check_value`` (a command, a ``dead`` action, a ``choices`` value) raises
  ``Mistake`` instead of argparse's ``invalid choice`` error;
* ``parse_known_args`` turns what the subcommand's parser did not recognise into a
  ``Mistake`` of that parser, so the message names ``redpool worker`` and its flags.

A ``Mistake`` is printed as one line, ``PROG: MESSAGE``, with a "did you mean" from
difflib.get_close_matches when a name is close enough, and exits 2.  Every other
error (a missing argument, a bad number) keeps argparse's wording: the usage once,
then the same one-line form.  So parse_known_args of this parser never returns
extras: it is used through parse_args.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from typing import Iterable, NoReturn

from .errors import EXIT_USAGE


class Mistake(Exception):
    """A name the parser does not know; ``str()`` is the whole message."""


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate ``word`` was most likely meant to be, if one is close enough.
    Leading dashes are compared away: every flag shares them, which would make
    ``--xyz`` look like ``--id``."""
    by_stem: dict[str, str] = {}
    for c in candidates:
        by_stem.setdefault(c.lstrip("-"), c)
    found = difflib.get_close_matches(word.lstrip("-"), list(by_stem), n=1, cutoff=0.6)
    return by_stem[found[0]] if found else None


def suggestion(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)``, or nothing."""
    match = closest(word, candidates)
    return f" (did you mean '{match}'?)" if match else ""


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors are one line, with suggestions."""

    def parse_known_args(self, args=None, namespace=None):
        try:
            namespace, extras = super().parse_known_args(args, namespace)
        except Mistake as m:
            self.fail(str(m))
        if extras:
            self.fail(self.unknown(extras))
        return namespace, extras

    def _check_value(self, action: argparse.Action, value) -> None:
        if action.choices is None or value in action.choices:
            return
        names = [str(c) for c in action.choices]
        if isinstance(action, argparse._SubParsersAction):
            what = "action" if action.dest == "action" else "command"
            raise Mistake(f"unknown {what} '{value}'{suggestion(str(value), names)}"
                          + ("" if closest(str(value), names) else
                             f" ({what}s: {', '.join(names)})"))
        label = action.option_strings[-1] if action.option_strings else action.dest
        hint = suggestion(str(value), names) or f" (choose from {', '.join(names)})"
        raise Mistake(f"invalid {label} '{value}'{hint}")

    def unknown(self, extras: list[str]) -> str:
        """The message for the first argument this parser did not take."""
        options = [s for a in self._actions if a.help != argparse.SUPPRESS
                   for s in a.option_strings]
        for arg in extras:
            if arg.startswith("-") and len(arg) > 1 and not _is_number(arg):
                flag = arg.split("=", 1)[0]
                hint = suggestion(flag, options) or f" ('{self.prog} --help' lists them)"
                return f"unknown option '{flag}'{hint}"
        return (f"unexpected argument '{extras[0]}' ('{self.prog} --help' shows what it "
                "takes)")

    def fail(self, message: str) -> NoReturn:
        """One line, exit 2: for a name we could suggest another for, no usage."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")

    def error(self, message: str) -> NoReturn:
        """argparse's own errors: the usage once, then one line."""
        self.print_usage(sys.stderr)
        self.fail(message)


def _is_number(arg: str) -> bool:
    try:
        float(arg)
    except ValueError:
        return False
    return True
