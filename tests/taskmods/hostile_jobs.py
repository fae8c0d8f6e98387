"""Tasks of tests/test_hostile_jobs.py (loaded beside tests.taskmods.jobs)."""

import json

from redpool import current_job, on_child_start, task


@task(name="h.codepoints", max_retries=1, retry_backoff=0.01, retry_backoff_max=0.01)
def codepoints(s):
    """Fails its first attempt; then the code points of ``s``, as the retry carried it."""
    if current_job().attempt == 1:
        raise RuntimeError("the first attempt fails on purpose")
    return [ord(c) for c in s]


@task(name="h.forged")
def forged():
    return "ran"


@on_child_start
def forge_answers():
    """For h.forged jobs, answer as a child that does not check its strings would: with
    a reply_to that no Redis key can be (an unpaired surrogate, let through escaped by
    json.dumps).  What the supervisor makes of it is the test."""
    from redpool import child

    real = child.encode_done

    def encode_done(token, out):
        if out.meta.get("task") != "h.forged":
            return real(token, out)
        out.meta.update(t=token, reply_to="forged:\ud800")
        meta = json.dumps(out.meta).encode()
        env, dead, retry = out.envelope or b"", out.dead or b"", out.retry or b""
        return (child.MSG_DONE + child.DONE_HEADER.pack(len(meta), len(env), len(dead), len(retry))
                + meta + env + dead + retry)

    child.encode_done = encode_done
