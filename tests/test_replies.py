"""replies.py: which keys a worker answers on.  The rule in a table, its patterns
matched exactly as the Redis server matches them (checked against a real one), and
the patterns an operator may not give, refused at start-up with the flag named."""

from __future__ import annotations

import pytest

from redpool import cli, config
from redpool.errors import ConfigError
from redpool.keys import glob_escape
from redpool.replies import ReplyRule, check_pattern, literal_prefix, suggest


@pytest.mark.parametrize("patterns, key, allowed", [
    ((), "redpool:reply:c1", True),                        # always: the client's lists
    ((), "myapp:replies", False),                          # another application's list
    ((), "other:queue:default", False),                    # another namespace's queue
    ((), "redpool:queue:default", False),                  # ours
    ((), "{redpool}:supervisors", False),                  # ours (Redis Cluster)
    ((), "redpoolx:reply:1", False),                       # only a look-alike
    (("myapp:replies:*",), "myapp:replies:42", True),
    (("myapp:replies:*",), "myapp:replies", False),
    (("myapp:replies:*",), "myapp:repliesX:1", False),
    (("myapp:r?",), "myapp:r1", True),
    (("myapp:r?",), "myapp:r12", False),
    (("r:[a-c]",), "r:b", True),
    (("r:[a-c]",), "r:d", False),
    (("r:[^a-c]",), "r:d", True),
    (("r:[c-a]",), "r:b", True),                           # Redis swaps a reversed range
    (("r:\\*",), "r:*", True),
    (("r:\\*",), "r:x", False),
    (("r:*",), "r:multi\nline", True),                     # * takes any byte
    (("r:?",), "r:é", False),                              # ? is one byte, é two
    (("r:??",), "r:é", True),
    (("*",), "anything:at:all", True),
    (("*",), "redpool:queue:default", False),              # never the namespace's keys
    (("a:*", "b:*"), "b:1", True),
])
def test_the_rule(patterns, key, allowed):
    assert ReplyRule("redpool", patterns).allows(key) is allowed


PATTERNS = ["x:*", "x:r?", "x:[a-c]*", "x:[^a-c]", "x:\\*", "x:*:end", "x:[b-]]", "x:[\\-]",
            "x:[]", "x:[^]", "x:é?", "x:?*?", "x:[\\]]", "x:\\[a\\]"]
KEYS = ["x:", "x:a", "x:b", "x:d", "x:*", "x:r1", "x:r12", "x:a:end", "x:b:end:x", "x:-",
        "x:]", "x:[a]", "x:éa", "x:é", "x:ab", "x:]x", "x:\\", "x:\n"]


def test_patterns_match_exactly_what_the_server_matches(r, namespace):
    # Given keys under a prefix of this test's own
    prefix = f"{namespace}-glob-"
    for k in KEYS:
        r.set(prefix + k, 1)
    for p in PATTERNS:
        try:
            check_pattern(p)
        except ValueError:
            continue  # refused: nothing to compare (see the next test)
        # When the server and the rule match the same pattern against them
        full = glob_escape(prefix) + p
        theirs = {k.decode()[len(prefix):] for k in r.scan_iter(match=full, count=1000)}
        rule = ReplyRule("redpool", [full])
        mine = {k for k in KEYS if rule.allows(prefix + k)}
        # Then they agree
        assert mine == theirs, p
    r.delete(*(prefix + k for k in KEYS))


@pytest.mark.parametrize("pattern, says", [
    ("", "must be non-empty"),
    ("a b", "without spaces"),
    ("a(b)", "parentheses"),
    ("x:[ab", "not closed"),
    ("x:[-a]", "a '-' in a [set]"),
    ("x:[a-]", "a '-' in a [set]"),
    ("x:[a-\\z]", "a '-' in a [set]"),
    ("x:\\", "escapes nothing"),
])
def test_patterns_redis_would_read_otherwise_are_refused(pattern, says):
    with pytest.raises(ValueError, match=says.replace("[", "\\[").replace("(", "\\(")):
        check_pattern(pattern)


def worker_config(*argv: str, **env: str) -> config.WorkerConfig:
    return config.resolve(cli.build_parser().parse_args(["worker", *argv]), env)


@pytest.mark.parametrize("pattern", ["redpool:*", "redpool:queue:*", "{redpool}:*",
                                     "redpool:result:j1", "redpool\\:queue:x"])
def test_a_pattern_inside_the_namespace_is_refused_at_start_up(pattern):
    with pytest.raises(ConfigError) as e:
        worker_config("--reply-to", "ok:*", "--reply-to", pattern)
    assert str(e.value).startswith(f"--reply-to: reply pattern {pattern!r} names keys inside "
                                   "the namespace 'redpool'")
    assert "'redpool:reply:', which is always allowed" in str(e.value)
    # also for another namespace, and from the environment
    ns_pattern = pattern.replace("redpool", "app")
    with pytest.raises(ConfigError, match="^REDPOOL_REPLY_TO: reply pattern"):
        worker_config("--namespace", "app", REDPOOL_REPLY_TO=f"ok:*,{ns_pattern}")


def test_patterns_come_from_flags_or_the_environment_and_reach_the_children():
    assert worker_config().reply_to == []
    cfg = worker_config("--reply-to", "a:*", "--reply-to", "redpool:reply:x*")
    assert cfg.reply_to == ["a:*", "redpool:reply:x*"]   # (the second one adds nothing)
    assert worker_config(REDPOOL_REPLY_TO="a:*, b:*").reply_to == ["a:*", "b:*"]
    assert cfg.child_defaults()["reply_patterns"] == ("a:*", "redpool:reply:x*")
    assert cfg.reply_rule().allows("a:1") and not cfg.reply_rule().allows("b:1")
    with pytest.raises(ConfigError, match="^REDPOOL_REPLY_TO: invalid key pattern 'x:\\[a'"):
        worker_config(REDPOOL_REPLY_TO="x:[a")


def test_literal_prefix():
    assert literal_prefix("myapp:replies:*") == "myapp:replies:"
    assert literal_prefix("a\\*b?c") == "a*b"
    assert literal_prefix("[ab]") == ""


@pytest.mark.parametrize("key, pattern", [
    ("myapp:replies:42", "myapp:replies:*"),
    ("myapp:replies", "myapp:replies*"),
    ("replies", "replies*"),
    ("a*b:c:d", "a\\*b:c:*"),
])
def test_the_suggested_pattern(key, pattern):
    assert suggest(key) == pattern
    assert ReplyRule("redpool", [pattern]).allows(key)
