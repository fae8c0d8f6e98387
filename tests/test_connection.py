"""connection.py and urls.py without a server: URL forms, TLS options, redaction, and
the messages a failed connection gets.  The real thing (a TLS proxy, ACL users, a
Sentinel failover) is in test_redis_deploy.py and test_sentinel.py."""

from __future__ import annotations

import pytest
import redis
from redis.sentinel import MasterNotFoundError

from redpool import connection, topology
from redpool.client import Client
from redpool.connection import (SentinelRedis, connect, explain, is_cluster_url,
                                parse_cluster_url, parse_sentinel_url,
                                tls_options, with_tls)
from redpool.errors import ConfigError
from redpool.queue import connect as supervisor_connect
from redpool.urls import redact_url


@pytest.fixture
def pem(tmp_path):
    """Three readable files standing in for a CA, a certificate and a key (nothing
    here opens them as PEM: no connection is made)."""
    paths = {}
    for name in ("ca", "cert", "key"):
        p = tmp_path / f"{name} file.pem"   # a space: must survive the URL round trip
        p.write_text("-----BEGIN NOTHING-----\n")
        paths[name] = str(p)
    return paths


# -- redaction --------------------------------------------------------------------------------

@pytest.mark.parametrize("url, shown", [
    ("redis://user:s3cret@db:6380/2", "redis://user:***@db:6380/2"),
    ("redis://:s3cret@db/0", "redis://:***@db/0"),
    ("redis://s3cret@db/0", "redis://***@db/0"),
    ("rediss://u:s3cret@db/0?ssl_ca_certs=/etc/ca.pem&ssl_keyfile=/etc/k.pem",
     "rediss://u:***@db/0?ssl_ca_certs=/etc/ca.pem&ssl_keyfile=/etc/k.pem"),
    ("rediss://db/0?ssl_certfile=/c.pem&ssl_password=s3cret",
     "rediss://db/0?ssl_certfile=/c.pem&ssl_password=***"),
    ("redis+sentinel://u:s3cret@s1:26379,s2:26379,s3/main/1",
     "redis+sentinel://u:***@s1:26379,s2:26379,s3/main/1"),
    ("rediss+sentinel://:s3cret@[::1]:26379,s2/main?sentinel_password=s3cret&db=2",
     "rediss+sentinel://:***@[::1]:26379,s2/main?sentinel_password=***&db=2"),
    ("redis+sentinel://s1,s2/main?sentinel_pass=s3cret&x-auth-token=s3cret&api_secret=s3cret",
     "redis+sentinel://s1,s2/main?***&***&***"),   # not redis-py's: hidden whole
    ("unix:///run/r.sock?db=1&p%61ssword=s3cret", "unix:///run/r.sock?db=1&p%61ssword=***"),
    ("redis://u:pa/ss?wo#rd@db/0", "redis://***"),   # not percent-encoded: malformed
    ("redis://u:pa#ss@db/0", "redis://u:***@db/0"),
    ("redis://u:p@ss@db/0?ssl_ca_certs=/a@b.pem", "redis://u:***@db/0?ssl_ca_certs=/a@b.pem"),
])
def test_passwords_never_survive_redaction_and_tls_paths_do(url, shown):
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url)


# -- Sentinel URLs ----------------------------------------------------------------------------

def test_a_sentinel_url_names_hosts_service_db_and_credentials():
    t = parse_sentinel_url("redis+sentinel://app:p%40ss@s1:26380,s2,[::1]:26381/my%20svc/3"
                           "?sentinel_password=sp&socket_keepalive=true")
    assert t.hosts == [("s1", 26380), ("s2", 26379), ("::1", 26381)]
    assert (t.service, t.db, t.username, t.password, t.tls) == ("my svc", 3, "app", "p@ss", False)
    assert t.options == {"sentinel_password": "sp", "socket_keepalive": "true"}
    assert parse_sentinel_url("rediss+sentinel://s1/main?db=4").db == 4
    assert parse_sentinel_url("rediss+sentinel://s1/main").tls is True


@pytest.mark.parametrize("url, why", [
    ("redis+sentinel://s1:26379", "name the service"),
    ("redis+sentinel://s1/main/0/extra", "name the service"),
    ("redis+sentinel://s1:port/main", "port is not a number"),
    ("redis+sentinel://s1,,s2/main", "empty"),
    ("redis+sentinel://s1/main/x", "db 'x'"),
])
def test_a_bad_sentinel_url_says_what_is_wrong_without_its_password(url, why):
    with pytest.raises(ConfigError, match=why) as e:
        parse_sentinel_url(url.replace("://", "://u:s3cret@"))
    assert "s3cret" not in str(e.value) and "use redis+sentinel://[user:password@]host" in str(e.value)


def test_a_password_that_cuts_the_address_short_is_not_quoted_as_a_port():
    # an unencoded '/' in the password: what looks like the port is the password
    with pytest.raises(ConfigError, match="percent-encode") as e:
        parse_sentinel_url("redis+sentinel://:s3cr3t/x@h1:26379/m")
    assert "s3cr3t" not in str(e.value)


# -- Redis Cluster URLs ---------------------------------------------------------------------------

def test_a_cluster_url_names_nodes_credentials_and_options():
    t = parse_cluster_url("redis+cluster://app:p%40ss@n1:7000,n2,[::1]:7001?socket_keepalive=true")
    assert t.hosts == [("n1", 7000), ("n2", 6379), ("::1", 7001)]
    assert (t.username, t.password, t.tls, t.options) == \
        ("app", "p@ss", False, {"socket_keepalive": "true"})
    assert parse_cluster_url("rediss+cluster://n1/0").tls is True
    assert is_cluster_url("REDIS+CLUSTER://n1") and not is_cluster_url("redis://n1")


@pytest.mark.parametrize("url, why", [
    ("redis+cluster://n1/2", "only database 0"),
    ("redis+cluster://n1?db=1", "only database 0"),
    ("redis+cluster://n1:port", "port is not a number"),
    ("redis+cluster://n1,,n2", "empty"),
])
def test_a_bad_cluster_url_says_what_is_wrong_without_its_password(url, why):
    with pytest.raises(ConfigError, match=why) as e:
        parse_cluster_url(url.replace("://", "://u:s3cret@"))
    assert "s3cret" not in str(e.value) and "use redis+cluster://" in str(e.value)


def test_the_supervisor_policy_holds_for_the_primary_and_the_sentinels():
    # Given the supervisor's connect (never retry a script blindly)
    r = supervisor_connect("redis+sentinel://u:pw@127.0.0.1:1,127.0.0.1:2/main/2"
                           "?sentinel_password=sp", blocking_timeout=1.0)
    try:
        assert isinstance(r, SentinelRedis)
        pool = r.connection_pool
        assert pool.service_name == "main" and pool.is_master
        kw = pool.connection_kwargs
        # Then the primary's connections: its credentials, db, timeouts, and no retry
        assert (kw["username"], kw["password"], kw["db"]) == ("u", "pw", 2)
        assert kw["retry"].get_retries() == 0 and kw["socket_timeout"] == 6.0
        # and the sentinels': their own password, short timeouts, no retry either
        for s in r.sentinel.sentinels:
            skw = s.connection_pool.connection_kwargs
            assert skw["password"] == "sp" and skw.get("username") is None
            assert skw["socket_timeout"] == skw["socket_connect_timeout"] == \
                topology.SENTINEL_TIMEOUT
            assert skw["retry"].get_retries() == 0
    finally:
        r.close()


def test_rediss_sentinel_uses_tls_towards_the_sentinels_and_the_primary(pem):
    r = connect("rediss+sentinel://s1,s2/main", ca=pem["ca"], cert=pem["cert"], key=pem["key"])
    try:
        pool = r.connection_pool
        assert issubclass(pool.connection_class, redis.SSLConnection)
        assert pool.connection_kwargs["ssl_ca_certs"] == pem["ca"]
        for s in r.sentinel.sentinels:
            skw = s.connection_pool.connection_kwargs
            assert issubclass(s.connection_pool.connection_class, redis.SSLConnection)
            assert (skw["ssl_certfile"], skw["ssl_keyfile"]) == (pem["cert"], pem["key"])
    finally:
        r.close()


def test_no_primary_known_to_the_sentinels_is_explained():
    url = "redis+sentinel://u:s3cret@127.0.0.1:1/orders"
    text = explain(MasterNotFoundError("No master found for 'orders'"), url)
    assert "no sentinel at redis+sentinel://u:***@127.0.0.1:1/orders knows a primary" in text
    assert "do they monitor 'orders'" in text and "s3cret" not in text


# -- TLS options ------------------------------------------------------------------------------

def test_tls_files_become_url_options_and_a_file_named_twice_must_agree(pem):
    url = with_tls("rediss://db:6380/0", ca=pem["ca"], cert=pem["cert"], key=pem["key"])
    assert url.startswith("rediss://db:6380/0?ssl_ca_certs=")
    assert connection._query(url) == {"ssl_ca_certs": pem["ca"], "ssl_certfile": pem["cert"],
                                      "ssl_keyfile": pem["key"]}
    assert with_tls(url, ca=pem["ca"]) == url            # the same file twice is fine
    with pytest.raises(ConfigError, match="--redis-ca .REDPOOL_REDIS_CA. says /other.pem but "
                                          "the Redis URL's ssl_ca_certs says"):
        with_tls(url, ca="/other.pem")
    r = connect(url)
    try:
        assert r.connection_pool.connection_kwargs["ssl_ca_certs"] == pem["ca"]
    finally:
        r.close()


def test_the_environment_is_a_default_that_the_url_and_arguments_override(pem):
    env = {"REDPOOL_REDIS_CA": "/env/ca.pem", "REDPOOL_REDIS_CERT": "/env/c.pem"}
    assert tls_options(env=env) == {"ca": "/env/ca.pem", "cert": "/env/c.pem"}
    assert tls_options(ca=pem["ca"], env=env) == {"ca": pem["ca"], "cert": "/env/c.pem"}
    # a URL that names its CA keeps it; the variable still gives the certificate
    assert tls_options(url="rediss://h/0?ssl_ca_certs=/u.pem", env=env) == {"cert": "/env/c.pem"}
    assert tls_options(env={}) == {}


@pytest.mark.parametrize("url, kw, message", [
    ("redis://db/0", {"ca": "CA"}, "need a TLS URL, rediss://, rediss\\+sentinel:// or rediss\\+cluster://"),
    ("redis+sentinel://s1/main?ssl_ca_certs=CA", {}, "need a TLS URL"),
    ("rediss://db/0", {"key": "KEY"}, "is the key of a client certificate: give the certificate"),
    ("rediss://db/0", {"ca": "/no/such/ca.pem"}, "ssl_ca_certs=/no/such/ca.pem .--redis-ca "
                                                 ".REDPOOL_REDIS_CA..: no such readable file"),
    ("redis://u:s3cret@db:port/0", {}, "the Redis URL is malformed: a port is not a number"),
    ("http://u:s3cret@db/0", {}, "does not start with a scheme redpool knows"),
    ("redis://u:s3cret@db/x?socket_timeout=soon", {}, "invalid Redis URL redis://u:\\*\\*\\*@db/x"),
])
def test_tls_and_url_mistakes_are_configuration_errors(pem, url, kw, message):
    kw = {k: pem[k] if v.isupper() else v for k, v in kw.items()}
    url = url.replace("=CA", f"={pem['ca']}")
    with pytest.raises(ConfigError, match=message) as e:
        connect(url, **kw)
    assert "s3cret" not in str(e.value)


def test_a_client_with_its_own_redis_takes_no_tls_files():
    with pytest.raises(ValueError, match="TLS files go with a URL"):
        Client(redis=redis.Redis(), ca="/etc/ca.pem")


# -- explaining failures ----------------------------------------------------------------------

@pytest.mark.parametrize("url, error, expected", [
    ("rediss://h:1/0", "Error 1 connecting to h:1. [SSL: CERTIFICATE_VERIFY_FAILED] certificate "
     "verify failed: self-signed certificate in certificate chain (_ssl.c:1006).",
     "not signed by a CA we trust"),
    ("rediss://h:1/0", "Error 1 connecting to h:1. [SSL: CERTIFICATE_VERIFY_FAILED] certificate "
     "verify failed: Hostname mismatch, certificate is not valid for 'h'. (_ssl.c:1006).",
     "does not name the host we connect to"),
    ("rediss://h:1/0", "Connection closed by server.",
     "most likely requires a client certificate (tls-auth-clients); pass --redis-cert"),
    ("rediss://h:1/0?ssl_certfile=/c.pem", "Connection closed by server.",
     "does not accept our client certificate"),
    ("rediss://h:1/0", "Error 8 while writing to socket. EOF occurred in violation of "
     "protocol (_ssl.c:2427).", "most likely requires a client certificate"),
    ("rediss://h:1/0", "Error 524297 connecting to h:1. [SSL] PEM lib (_ssl.c:3926).",
     "cannot load our TLS client certificate or key"),
    ("rediss://h:1/0", "Timeout connecting to server", "cannot reach Redis at rediss://h:1/0"),
    ("rediss://h:1/0", "Error 1 connecting to h:1. [SSL: WRONG_VERSION_NUMBER] wrong version "
     "number", "is this port the server's tls-port?"),
    ("redis://h:1/0", "Connection closed by server.", "if the server expects TLS, use rediss://"),
    ("redis://h:1/0", "Error 111 connecting to h:1. Connection refused.",
     "cannot reach Redis at redis://h:1/0: Error 111"),
])
def test_connection_failures_are_explained(url, error, expected):
    assert expected in explain(redis.ConnectionError(error), url)


def test_refused_credentials_and_permissions_are_explained():
    url = "redis://app:s3cret@h/0"
    text = explain(redis.AuthenticationError("WRONGPASS invalid username-password pair"), url)
    assert text.startswith("Redis at redis://app:***@h/0 refused our credentials: WRONGPASS")
    text = explain(redis.exceptions.NoPermissionError("User app has no permissions to run "
                                                      "the 'ping' command"), url)
    assert "may not run what redpool needs" in text and "redpool acl" in text
