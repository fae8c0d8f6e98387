"""The pure half of tests/test_docs.py: find the fenced blocks of a Markdown page, read
the `<!-- docs-test: ... -->` comment that says how each is checked, and compare a
transcript's expected output with what a command really printed.

Nothing here starts a process or talks to Redis, so tests/test_docs.py can check this
part in milliseconds and say exactly which block of which page is wrong.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Languages whose blocks run unless a comment says otherwise.
RUNNABLE = {"python": "python", "py": "python", "sh": "sh", "bash": "sh", "shell": "sh",
            "console": "console"}

_FENCE = re.compile(r"^(?P<indent> {0,3}|(?:  )+)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")


def pages() -> list[Path]:
    """Every page the harness is responsible for: README.md and docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass
class Block:
    page: Path
    line: int                   # 1-based line of the opening fence
    lang: str                   # the info string's first word, lower case ("" if none)
    text: str                   # the content, the fence's indentation removed
    directive: str | None       # the body of the docs-test comment just above, if any
    section: str = ""           # the level-2 heading above it ("## Other languages")

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def __repr__(self) -> str:  # pytest ids and failure messages
        return f"<{self.lang or 'text'} block {self.where}>"


def parse_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of ``page``, in order (CommonMark fences, list-indented
    ones included).  The directive is the comment on the last non-blank line above."""
    lines = page.read_text("utf-8").splitlines()
    blocks: list[Block] = []
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line.strip()
        m = _FENCE.match(line)
        if not m:
            i += 1
            continue
        indent, fence = len(m.group("indent")), m.group("fence")
        close = re.compile(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not close.match(lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{page.name}:{i + 1}: a code fence that is never closed")
        blocks.append(Block(page, i + 1, (m.group("info").split() or [""])[0].lower(),
                            "\n".join(body) + "\n", _directive_above(lines, i), section))
        i = j + 1
    return blocks


def _directive_above(lines: list[str], i: int) -> str | None:
    k = i - 1
    while k >= 0 and not lines[k].strip():
        k -= 1
    m = _DIRECTIVE.match(lines[k]) if k >= 0 else None
    return m.group("body") if m else None


# -- what a directive asks for ------------------------------------------------------------------

@dataclass
class Plan:
    """How one block is accounted for."""
    kind: str                   # run | skip | elsewhere | file | output | result | dead | conf
    reason: str = ""            # skip: why; elsewhere: the test file; file: the path
    command: str | None = None  # output of `CMD`
    job: dict | None = None     # result of / dead letter of JOB
    numbers_vary: bool = False  # compare with every number replaced
    given: list[str] = field(default_factory=list)   # named set-ups to run first
    fresh: bool = False         # stop the page's workers, clear its keys, first


class DirectiveError(ValueError):
    pass


#: Blocks nobody marked, checked by another test file: (page, section) -> test file.
#: The "Other languages" section of protocol.md belongs to the polyglot examples'
#: own harness, which runs the Node.js, Ruby and Go programs from the page itself.
SECTIONS_ELSEWHERE = {("docs/protocol.md", "## Other languages"): "tests/test_docs_polyglot.py"}


def plan(block: Block) -> Plan:
    """The plan for ``block``, or DirectiveError saying what is missing."""
    rel = str(block.page.relative_to(ROOT))
    if block.directive is None:
        owner = SECTIONS_ELSEWHERE.get((rel, block.section))
        if owner:
            return Plan("elsewhere", owner)
        if block.lang in RUNNABLE:
            return Plan("run")
        raise DirectiveError(
            f"{block.where}: a {block.lang or 'plain'} block that nothing checks: run it "
            "(python, sh, console), or say how above it, e.g. <!-- docs-test: output -->, "
            "<!-- docs-test: file PATH -->, <!-- docs-test: skip (why) -->")
    return parse_directive(block.directive, block)


def parse_directive(text: str, block: Block) -> Plan:
    body = text.strip()
    m = re.match(r"skip\s*\((?P<why>.+)\)$", body)
    if m:
        return Plan("skip", m.group("why").strip())
    if body == "skip" or body.startswith("skip "):
        raise DirectiveError(f"{block.where}: skip needs a reason: skip (why)")
    if re.fullmatch(r"tests/[\w/]+\.py", body):
        return Plan("elsewhere", body)
    m = re.match(r"file\s+(?P<path>\S+)$", body)
    if m:
        return Plan("file", m.group("path"))
    p = Plan("run")
    rest = body
    m = re.search(r"\s*\(numbers vary\)\s*$", rest)
    if m:
        p.numbers_vary, rest = True, rest[:m.start()]
    for word in re.findall(r"\bgiven\s+([\w-]+)", rest):
        p.given.append(word)
    rest = re.sub(r",?\s*\bgiven\s+[\w-]+", "", rest).strip(" ,")
    if re.match(r"fresh\b", rest):
        p.fresh, rest = True, rest[len("fresh"):].strip(" ,")
    m = re.match(r"output of `(?P<cmd>[^`]+)`$", rest)
    if m:
        p.kind, p.command = "output", m.group("cmd")
    elif rest == "output":
        p.kind = "output"
    elif rest.startswith(("result of ", "dead letter of ")):
        p.kind = "result" if rest.startswith("result") else "dead"
        try:
            p.job = json.loads(rest.split(" of ", 1)[1])
        except ValueError as e:
            raise DirectiveError(f"{block.where}: the job after '{rest.split(' of ')[0]} of' "
                                 f"is not JSON: {e}") from None
    elif rest == "redis.conf":
        p.kind = "conf"
    elif rest:
        raise DirectiveError(f"{block.where}: docs-test does not know {rest!r}")
    elif block.lang not in RUNNABLE:
        raise DirectiveError(f"{block.where}: a {block.lang or 'plain'} block cannot run")
    return p


# -- comparing output ---------------------------------------------------------------------------

def _hostname_rule() -> list[tuple[re.Pattern, str]]:
    host = re.escape(socket.gethostname())
    return [(re.compile(rf"\b{host}\b"), "<host>")] if host else []


#: What differs between the page's example and a real run, each replaced by a token on
#: both sides ("modulo times, ids, pids and hosts").  Order matters: URLs before times
#: (a port is a number), times before durations.
NORMALISE: list[tuple[re.Pattern, str]] = [
    # any Redis URL: the page names placeholder hosts, the run a private server
    (re.compile(r"\b(?:rediss?|unix)(?:\+\w+)?://[^\s,'\"\\)]+"), "<url>"),
    # wall-clock times: ISO 8601 with or without T, and unix seconds
    (re.compile(r"\b\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d+)?(?:Z| UTC|[+-]\d\d:\d\d)?"), "<time>"),
    (re.compile(r"\b1\d{9}(?:\.\d+)?\b"), "<unix>"),
    # ids the worker or client makes up (uuid4().hex)
    (re.compile(r"\b[0-9a-f]{32}\b"), "<id>"),
    # durations and ages: 0.42 s, 12ms, 1.8s, 2m05s, 23h59m
    (re.compile(r"\b(?:\d+h)?\d+m\d+s\b|\b\d+h\d+m\b|\b\d+(?:\.\d+)?\s?(?:ms|µs|s)\b"), "<dur>"),
    # process ids
    (re.compile(r"\b(pid[ =]?|process )\d+"), r"\1<pid>"),
    # host and supervisor names: the page's web-1, web-2, ...; the run's host name
    (re.compile(r"\bweb-\d+\b"), "<host>"),
    # where a traceback's file is (the page: /srv/app/...; the run: this checkout)
    (re.compile(r'File \\?"[^"\\]+\\?", line \d+'), 'File "<path>", line <n>'),
]
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def normalise(text: str, numbers_vary: bool = False) -> list[str]:
    rules = NORMALISE + _hostname_rule()
    out = []
    for line in text.splitlines():
        for pattern, token in rules:
            line = pattern.sub(token, line)
        if numbers_vary:
            line = _NUMBER.sub("N", line)
        out.append(re.sub(r"[ \t]+", " ", line).strip())
    while out and not out[-1]:
        out.pop()
    return out


def _line_pattern(expected: str) -> re.Pattern:
    """An expected line; `...` inside it stands for any text (a cut column, an elision)."""
    return re.compile(".*?".join(re.escape(part) for part in expected.split("...")) + r"\Z")


def mismatch(expected: str, actual: str, numbers_vary: bool = False) -> str | None:
    """None if ``actual`` is what ``expected`` shows, else a readable difference.

    Both sides are normalised (above); a line that is only ``...`` stands for any number
    of lines, and ``...`` inside a line for any text."""
    want, got = normalise(expected, numbers_vary), normalise(actual, numbers_vary)
    if _match(want, got):
        return None
    return ("expected (normalised):\n  " + "\n  ".join(want) +
            "\ngot (normalised):\n  " + "\n  ".join(got))


def _match(want: list[str], got: list[str]) -> bool:
    # a small backtracking match: `...` lines are rare, and outputs short
    if not want:
        return not got
    if want[0] == "...":
        return any(_match(want[1:], got[k:]) for k in range(len(got) + 1))
    return bool(got) and bool(_line_pattern(want[0]).match(got[0])) and _match(want[1:], got[1:])


# -- transcripts --------------------------------------------------------------------------------

@dataclass
class Step:
    command: str
    expected: str


def transcript(text: str) -> list[Step]:
    """``$ command`` lines (a trailing backslash continues one) and what each printed."""
    steps: list[Step] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if steps:
                steps[-1].expected += line + "\n"
            elif line.strip():
                raise ValueError(f"a transcript must start with a '$ ' command, not {line!r}")
            i += 1
            continue
        command = line[2:]
        while command.endswith("\\") and i + 1 < len(lines):
            i += 1
            command = command[:-1] + "\n" + lines[i]
        steps.append(Step(command, ""))
        i += 1
    return steps


def shell_commands(text: str) -> list[str]:
    """The commands of a sh block: comment lines dropped, continuations joined."""
    commands: list[str] = []
    current = ""
    for line in text.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line + "\n"
        if not line.rstrip().endswith("\\"):
            commands.append(current.strip())
            current = ""
    if current.strip():
        commands.append(current.strip())
    return commands
