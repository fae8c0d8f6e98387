"""Hand-picked hostile job documents, one test each, for the classes of issue 12 on the
decode side (and the ones that reach the encode side through what a job carries), run
against one long-lived daemon.  Each case is pushed exactly as a producer in another
language could write it (raw bytes), then every invariant of invariants.py is checked.
"""

from __future__ import annotations


import pytest

from hostile.invariants import Case, waiting

pytestmark = pytest.mark.daemon


def doc(chk, body: str, label: str | None = None, **kw) -> Case:
    """A case from JSON text ``body`` (an object's members, written by hand so that
    escapes, NaN and duplicate keys stay as written), with this case's id and reply_to
    first."""
    label = label or chk.label()
    raw = ('{"id":"%s","reply_to":"%s",%s}' % (label, chk.reply(label), body)).encode()
    return Case(raw, label, id=label, reply_to=chk.reply(label), **kw)


def deep(n: int) -> str:
    return "[" * n + "]" * n


# name -> cases of one test (chk -> list[Case]); the answer of each must be a failure
# unless said otherwise.
CASES = {
    # -- strings JSON can hold and UTF-8 cannot: lone surrogates, written as escapes
    "surrogate in task": lambda chk: [doc(chk, r'"task":"h.ok\ud800"', status="failed")],
    "surrogate alone as task": lambda chk: [doc(chk, r'"task":"\udfff"', status="failed")],
    "surrogate in reply_to": lambda chk: [
        Case(b'{"id":"srt","reply_to":"%s\\udc80","task":"h.ok"}' % chk.reply("srt").encode(),
             "srt", id="srt")],
    "surrogate in id": lambda chk: [
        Case(b'{"task":"h.ok","id":"x\\ud800","reply_to":"%s"}' % chk.reply("sid").encode(),
             "sid", reply_to=chk.reply("sid"), status="failed")],
    "surrogate in args": lambda chk: [doc(chk, r'"task":"h.echo","args":["\ud800"]')],
    "surrogate in a kwargs name the task lacks": lambda chk: [
        doc(chk, r'"task":"h.one","kwargs":{"\ud800":1}', status="failed")],
    "surrogate in an unknown field": lambda chk: [doc(chk, r'"task":"h.ok","\udc00":"\ud800"')],
    "surrogate in args of a job retried": lambda chk: [
        doc(chk, r'"task":"h.boom","args":["\ud800"],"max_retries":1,"retry_backoff":0.01',
            status="failed", error_type="ValueError")],
    # -- numbers Python reads as non-finite floats
    "NaN in args": lambda chk: [doc(chk, '"task":"h.echo","args":[NaN]')],
    "Infinity in kwargs": lambda chk: [doc(chk, '"task":"h.echo","kwargs":{"x":-Infinity}')],
    "1e400 in enqueued_at": lambda chk: [doc(chk, '"task":"h.ok","enqueued_at":1e400',
                                             status="failed", error_type="InvalidJob")],
    "1e400 as timeout": lambda chk: [doc(chk, '"task":"h.ok","timeout":1e400',
                                         status="failed", error_type="InvalidJob")],
    "NaN in an unknown field of a job retried": lambda chk: [
        doc(chk, '"task":"h.boom","x":NaN,"max_retries":1,"retry_backoff":0.01',
            status="failed")],
    "1e400 in args of a job retried": lambda chk: [
        doc(chk, '"task":"h.boom","args":[1e400],"max_retries":1,"retry_backoff":0.01',
            status="failed")],
    # -- nesting
    "args nested 100000 deep": lambda chk: [doc(chk, '"task":"h.echo","args":' + deep(100000),
                                                status="failed")],
    "args nested 900 deep": lambda chk: [doc(chk, '"task":"h.echo","args":' + deep(900))],
    "id nested 900 deep": lambda chk: [
        Case(b'{"task":"h.ok","reply_to":"%s","id":%s}' % (chk.reply("nid").encode(),
             deep(900).encode()), "nid", reply_to=chk.reply("nid"), status="failed")],
    "result_ttl nested 990 deep": lambda chk: [doc(chk, '"task":"h.ok","result_ttl":' + deep(990),
                                                   status="failed")],
    "unknown field nested 990 deep": lambda chk: [doc(chk, '"task":"h.ok","x":' + deep(990))],
    # -- bytes that are not UTF-8 around a readable id and reply_to
    "invalid UTF-8 after id and reply_to": lambda chk: [
        Case(b'{"id":"u8","reply_to":"%s","task":"h.ok","x":"\xff\xfe"}'
             % chk.reply("u8").encode(), "u8", id="u8", reply_to=chk.reply("u8"),
             status="failed")],
    "CESU-8 surrogate bytes": lambda chk: [
        Case(b'{"id":"ce","reply_to":"%s","task":"h.ok","x":"\xed\xa0\x80"}'
             % chk.reply("ce").encode(), "ce", id="ce", reply_to=chk.reply("ce"),
             status="failed")],
    # -- JSON Python will not read, and documents that are too large
    "UTF-8 byte order mark before the object": lambda chk: [
        Case(b'\xef\xbb\xbf{"id":"bom","reply_to":"%s","task":"h.ok"}' % chk.reply("bom").encode(),
             "bom", id="bom", reply_to=chk.reply("bom"))],
    "16 MB, far over --max-payload": lambda chk: [
        doc(chk, '"task":"h.echo","args":["' + "z" * (16 * 1024 * 1024) + '"]', status="failed",
            error_type="PayloadTooLarge")],
    "integer of 5000 digits": lambda chk: [doc(chk, '"task":"h.echo","args":[' + "7" * 5000 + "]")],
    # -- retries with numbers near the edges
    "attempt 1100 of a job retried": lambda chk: [
        doc(chk, '"task":"h.boom","attempt":1100,"max_retries":1100,"retry_backoff":0.001,'
                 '"retry_backoff_max":0.05', status="failed")],
    # -- duplicate keys, control characters, non-BMP
    "duplicate keys": lambda chk: [doc(chk, '"task":"h.boom","task":"h.ok","args":[1],"args":[]',
                                       status="succeeded")],
    "control characters in task": lambda chk: [doc(chk, r'"task":"h.ok\u0000\u001b[2J\n"',
                                                   status="failed", error_type="UnknownTask")],
    "non-BMP characters": lambda chk: [doc(chk, '"task":"h.echo","args":["\U0001f600\U00010000"]',
                                           status="succeeded")],
}


XFAIL: dict = {}


@pytest.mark.parametrize("name", [pytest.param(n, marks=XFAIL.get(n, ())) for n in CASES])
def test_document(worker, name):
    worker.run(CASES[name])
