"""config.resolve: defaults, flag over environment over default, and errors that name
the flag or variable that was wrong.  Arguments are parsed by the real CLI parser."""

from __future__ import annotations

import os
import socket

import pytest

from redpool import cli, config
from redpool.errors import EXIT_USAGE, ConfigError
from redpool.protocol import DEFAULT_MAX_PAYLOAD, DEFAULT_NAMESPACE, NAME_RE


def resolve(*argv: str, **env: str) -> config.WorkerConfig:
    args = cli.build_parser().parse_args(["worker", *argv])
    return config.resolve(args, env)


def config_error(*argv: str, **env: str) -> str:
    with pytest.raises(ConfigError) as e:
        resolve(*argv, **env)
    assert e.value.exit_code == EXIT_USAGE
    return str(e.value)


# -- defaults ---------------------------------------------------------------------------------

def test_defaults():
    cfg = resolve()
    assert cfg.modules == []
    assert cfg.redis_url == "redis://localhost:6379/0"
    assert cfg.queues == ["default"]
    assert cfg.namespace == DEFAULT_NAMESPACE
    assert cfg.grace == 30.0
    assert cfg.burst is False
    assert cfg.max_payload == DEFAULT_MAX_PAYLOAD
    assert cfg.dead_max == 10_000
    assert cfg.lease == 15.0
    assert (cfg.log_level, cfg.log_format) == ("info", "auto")


def test_concurrency_defaults_to_the_usable_cores_and_prefetch_to_concurrency():
    cfg = resolve()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert cfg.concurrency == config.usable_cores() == cores
    assert cfg.prefetch == cfg.concurrency
    assert resolve("--concurrency", "7").prefetch == 7


def test_prefetch_can_be_set_apart_from_concurrency():
    cfg = resolve("--concurrency", "4", "--prefetch", "0")
    assert (cfg.concurrency, cfg.prefetch) == (4, 0)


def test_name_defaults_to_a_valid_host_based_name():
    cfg = resolve()
    assert cfg.name == config.default_name()
    assert NAME_RE.match(cfg.name)
    host = socket.gethostname()
    assert cfg.name == "".join(c if c.isalnum() or c in "._-" else "-" for c in host)[:128]


def test_default_name_cleans_a_host_name_with_odd_characters(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "web 1:prod/α")
    name = config.default_name()
    assert NAME_RE.match(name)
    assert name.startswith("web-1-prod-")
    monkeypatch.setattr(socket, "gethostname", lambda: "h" * 300)
    assert config.default_name() == "h" * 128


def test_the_process_environment_is_read_when_none_is_given(monkeypatch):
    monkeypatch.setenv("REDPOOL_QUEUE", "from-os-env")
    args = cli.build_parser().parse_args(["worker"])
    assert config.resolve(args).queues == ["from-os-env"]


# -- precedence -------------------------------------------------------------------------------

def test_flags_win_over_the_environment():
    cfg = resolve("--concurrency", "3", "--queue", "flagq", "--namespace", "flagns",
                  "--grace", "1.5", "--name", "flag-name", "--redis-url", "redis://flag:1/2",
                  REDPOOL_CONCURRENCY="9", REDPOOL_QUEUE="envq", REDPOOL_NAMESPACE="envns",
                  REDPOOL_GRACE="99", REDPOOL_NAME="env-name", REDPOOL_REDIS_URL="redis://env:1/0")
    assert cfg.concurrency == 3
    assert cfg.queues == ["flagq"]
    assert cfg.namespace == "flagns"
    assert cfg.grace == 1.5
    assert cfg.name == "flag-name"
    assert cfg.redis_url == "redis://flag:1/2"


def test_the_environment_wins_over_defaults():
    cfg = resolve(REDPOOL_CONCURRENCY="5", REDPOOL_PREFETCH="1", REDPOOL_NAMESPACE="envns",
                  REDPOOL_GRACE="2.5", REDPOOL_NAME="env-name", REDPOOL_LEASE="4",
                  REDPOOL_DEAD_MAX="50", REDPOOL_MAX_PAYLOAD="4096", REDPOOL_LOG_LEVEL="debug",
                  REDPOOL_LOG_FORMAT="json", REDPOOL_REDIS_URL="redis://env:1/0")
    assert (cfg.concurrency, cfg.prefetch) == (5, 1)
    assert cfg.namespace == "envns"
    assert cfg.grace == 2.5
    assert cfg.name == "env-name"
    assert cfg.lease == 4.0
    assert cfg.dead_max == 50
    assert cfg.max_payload == 4096
    assert (cfg.log_level, cfg.log_format) == ("debug", "json")
    assert cfg.redis_url == "redis://env:1/0"


def test_an_empty_environment_variable_counts_as_unset():
    cfg = resolve(REDPOOL_CONCURRENCY="", REDPOOL_QUEUE="", REDPOOL_NAME="")
    assert cfg.queues == ["default"]
    assert cfg.concurrency == config.usable_cores()
    assert cfg.name == config.default_name()


# -- queues -----------------------------------------------------------------------------------

def test_env_queue_list_is_split_on_commas_and_spaces():
    assert resolve(REDPOOL_QUEUE="high, default").queues == ["high", "default"]
    assert resolve(REDPOOL_QUEUE=" high  low,,mid ").queues == ["high", "low", "mid"]


def test_repeated_queue_flags_keep_their_priority_order():
    assert resolve("--queue", "high", "--queue", "default", "--queue", "low").queues == \
        ["high", "default", "low"]


def test_queue_flag_is_one_name_not_a_list():
    assert "invalid queue name" in config_error("--queue", "high, default")


def test_duplicate_queue_is_rejected():
    msg = config_error("--queue", "a", "--queue", "b", "--queue", "a")
    assert "--queue" in msg and "twice" in msg
    assert "twice" in config_error(REDPOOL_QUEUE="a,a")


def test_empty_queue_name_is_rejected():
    assert "--queue" in config_error("--queue", "")


def test_queue_names_may_contain_colons():
    assert resolve("--queue", "emails:high").queues == ["emails:high"]


# -- burst ------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("1", True), ("true", True), ("YES", True), ("on", True),
    ("0", False), ("false", False), ("no", False), ("off", False),
])
def test_redpool_burst_from_the_environment(value, expected):
    assert resolve(REDPOOL_BURST=value).burst is expected


def test_burst_flag():
    assert resolve("--burst").burst is True
    assert resolve("--burst", REDPOOL_BURST="0").burst is True


def test_bad_redpool_burst_names_the_variable():
    msg = config_error(REDPOOL_BURST="maybe")
    assert msg.startswith("REDPOOL_BURST:") and "maybe" in msg


# -- modules ----------------------------------------------------------------------------------

def test_modules_from_arguments():
    assert resolve("app.tasks", "other.tasks").modules == ["app.tasks", "other.tasks"]


def test_modules_from_redpool_modules():
    assert resolve(REDPOOL_MODULES="app.tasks, other.tasks").modules == ["app.tasks", "other.tasks"]
    assert resolve(REDPOOL_MODULES="a b").modules == ["a", "b"]


def test_module_arguments_win_over_redpool_modules():
    assert resolve("mine", REDPOOL_MODULES="theirs").modules == ["mine"]


# -- bad values name their source -------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--concurrency", "0"), ("--concurrency", "-2"), ("--concurrency", "many"),
    ("--concurrency", "1.5"), ("--prefetch", "lots"), ("--grace", "soon"),
    ("--max-payload", "0"), ("--dead-max", "-1"), ("--lease", "0"), ("--lease", "x"),
])
def test_bad_flag_value_names_the_flag(flag, value):
    msg = config_error(flag, value)
    assert msg.startswith(f"{flag}:"), msg


@pytest.mark.parametrize("var, value", [
    ("REDPOOL_CONCURRENCY", "0"), ("REDPOOL_CONCURRENCY", "four"), ("REDPOOL_PREFETCH", "x"),
    ("REDPOOL_GRACE", "x"), ("REDPOOL_LEASE", "-1"), ("REDPOOL_MAX_PAYLOAD", "big"),
    ("REDPOOL_DEAD_MAX", "0"), ("REDPOOL_NAME", "a:b"),
])
def test_bad_env_value_names_the_variable(var, value):
    msg = config_error(**{var: value})
    assert msg.startswith(f"{var}:"), msg


def test_greater_than_zero_is_said_plainly():
    assert "greater than 0" in config_error("--concurrency", "0")


@pytest.mark.parametrize("name", ["a:b", "", "has space", "x" * 129, "ünï", "a/b"])
def test_invalid_name_is_rejected(name):
    # (an empty --name counts as given: it must not silently fall back to the host name)
    assert config_error("--name", name).startswith("--name:")


def test_name_with_colon_explains_the_rule():
    msg = config_error("--name", "web:1")
    assert "no ':'" in msg


def test_valid_names():
    for name in ("web-1", "a.b_c", "x" * 128):
        assert resolve("--name", name).name == name


def test_max_result_size_defaults_to_16_mib_and_takes_sizes_with_units():
    assert resolve().max_result_size == 16 * 1024 * 1024
    assert resolve("--max-result-size", "64M").max_result_size == 64 * 1024 * 1024
    assert resolve("--max-result-size", "1048576").max_result_size == 1024 * 1024
    assert resolve(REDPOOL_MAX_RESULT_SIZE="512k").max_result_size == 512 * 1024
    assert resolve("--max-result-size", "2M", REDPOOL_MAX_RESULT_SIZE="512k").max_result_size \
        == 2 * 1024 * 1024


@pytest.mark.parametrize("value", ["0", "1000", "129M", "1G", "big", "-1"])
def test_max_result_size_out_of_range_is_refused_saying_why(value):
    msg = config_error("--max-result-size", value)
    assert msg.startswith("--max-result-size:"), msg
    if value[0].isdigit():
        assert "from 1K to 128M (Redis refuses strings over 512 MB)" in msg


def test_bad_log_level_and_format():
    assert config_error("--log-level", "verbose").startswith("--log-level:")
    assert config_error("--log-format", "xml").startswith("--log-format:")
    assert resolve("--log-level", "WARNING").log_level == "warning"


def test_negative_prefetch_is_refused():
    assert config_error("--prefetch", "-3").startswith("--prefetch:")
    assert resolve("--prefetch", "0").prefetch == 0


def test_every_setting_has_a_unique_flag_and_env_var():
    flags = [s.flag for s in config.SETTINGS]
    envs = [s.env for s in config.SETTINGS]
    assert len(set(flags)) == len(flags) and len(set(envs)) == len(envs)
    assert all(e.startswith("REDPOOL_") for e in envs)
    assert all(e == "REDPOOL_" + s.flag[2:].upper().replace("-", "_")
               for e, s in zip(envs, config.SETTINGS) if s.dest != "queues")
    fields = set(config.WorkerConfig.__dataclass_fields__)
    assert {s.dest for s in config.SETTINGS} <= fields


# -- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("flag, value", [
    ("--lease", "nan"), ("--lease", "inf"), ("--grace", "nan"), ("--grace", "-5"),
])
def test_non_finite_or_negative_durations_are_rejected(flag, value):
    assert config_error(flag, value).startswith(f"{flag}:")


def test_namespace_with_space_is_a_config_error():
    assert config_error("--namespace", "my jobs").startswith("--namespace:")


def test_checks_after_parsing_name_the_variable_the_value_came_from():
    assert config_error(REDPOOL_LOG_LEVEL="verbose").startswith("REDPOOL_LOG_LEVEL:")


def test_worker_config_defaults_agree_with_the_settings_table():
    # WorkerConfig() is built directly by tests and embedders: its defaults must be the
    # table's (None in the table means "decided at resolve time", e.g. the cores)
    from redpool.config import SETTINGS, WorkerConfig
    cfg = WorkerConfig()
    drift = {s.dest: (getattr(cfg, s.dest), s.default) for s in SETTINGS
             if s.default is not None and getattr(cfg, s.dest) != s.default}
    assert drift == {}


def test_the_redis_url_comes_from_a_flag_a_file_or_a_variable_and_never_two(tmp_path):
    f = tmp_path / "url"
    f.write_text("  redis://:pw@from-file:6379/0\n\n")
    assert resolve().redis_url == "redis://localhost:6379/0"
    assert resolve(REDPOOL_REDIS_URL="redis://env/0").redis_url == "redis://env/0"
    cfg = resolve(REDPOOL_REDIS_URL_FILE=str(f))
    assert (cfg.redis_url, cfg.redis_url_file) == ("redis://:pw@from-file:6379/0", str(f))
    cfg = resolve("--redis-url-file", str(f), REDPOOL_REDIS_URL="redis://env/0")
    assert (cfg.redis_url, cfg.redis_url_file) == ("redis://:pw@from-file:6379/0", str(f))
    cfg = resolve("--redis-url", "redis://flag/0", REDPOOL_REDIS_URL_FILE=str(f))
    assert (cfg.redis_url, cfg.redis_url_file) == ("redis://flag/0", None)
    assert "both name the Redis URL" in config_error("--redis-url", "redis://flag/0",
                                                     "--redis-url-file", str(f))
    assert "are both set" in config_error(REDPOOL_REDIS_URL="redis://env/0",
                                          REDPOOL_REDIS_URL_FILE=str(f))
