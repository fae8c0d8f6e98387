"""Hypothesis-generated hostile job documents, pushed by LPUSH onto one long-lived
daemon (2 pool processes) in batches, each batch followed by every invariant of
invariants.py.  One test per class of documents (documents.py): the classes that hold
today run as they are; each class waiting for a fix of issue 12 is a strict xfail of its
own, with the failing examples found so far pinned by @example.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from hostile import documents as docs
from hostile.invariants import waiting

pytestmark = [pytest.mark.daemon, pytest.mark.timeout(600)]

WORKER_ARGS = ("--retry-backoff", "0.01", "--retry-backoff-max", "0.05")

#: Each example is a batch of documents run on a real daemon: slow by Hypothesis's
#: measure, large (deep nesting), and some strategies filter out what would be valid.
CORPUS = settings(deadline=None, database=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
    HealthCheck.large_base_example])
#: A class waiting for a fix (invariants.waiting) fails on its pinned examples first:
#: no need to shrink what it finds.
WAITING = settings(CORPUS, max_examples=40, phases=[Phase.explicit, Phase.generate])


def batches(strategy, size: int = 8):
    return st.lists(strategy, min_size=1, max_size=size)


def run(worker, batch) -> None:
    worker.run(lambda chk: [build(chk) for build in batch])


@settings(CORPUS, max_examples=100)
@given(batch=batches(docs.documents()))
def test_wrong_types_unknown_fields_and_odd_values(worker, batch):
    run(worker, batch)


@settings(CORPUS, max_examples=40)
@given(batch=batches(docs.unreadable()))
def test_unreadable_bytes_are_dead_lettered(worker, batch):
    run(worker, batch)


@settings(CORPUS, max_examples=80)
@given(batch=batches(docs.odd_values_in_jobs_not_retried()))
def test_surrogates_and_non_finite_numbers_in_jobs_not_retried(worker, batch):
    run(worker, batch)


@settings(CORPUS, max_examples=40)
@given(batch=batches(docs.surrogates_in_task_or_reply_to()))
@example(batch=[docs.fixed(rb'"task":"\ud800"')])
@example(batch=[docs.fixed(b'"task":"h.ok"', reply_suffix=rb"\udc80")])
def test_surrogates_in_task_or_reply_to(worker, batch):
    run(worker, batch)


@settings(CORPUS, max_examples=40)
@given(batch=batches(docs.non_finite_numbers_in_retried_jobs()))
@example(batch=[docs.fixed(b'"task":"h.boom","x":NaN,"max_retries":1')])
def test_non_finite_numbers_in_retried_jobs(worker, batch):
    run(worker, batch)


@settings(CORPUS, max_examples=40)
@given(batch=batches(docs.surrogates_in_retried_jobs()))
@example(batch=[docs.fixed(rb'"task":"h.boom","args":["\ud800"],"max_retries":1')])
def test_surrogates_in_retried_jobs(worker, batch):
    run(worker, batch)


@settings(CORPUS, max_examples=40)
@given(batch=batches(docs.deep_nesting()))
@example(batch=[docs.fixed(b'"task":"h.ok","x":' + b"[" * 990 + b"]" * 990)])
def test_deep_nesting(worker, batch):
    run(worker, batch)


@settings(CORPUS, max_examples=40)
@given(batch=batches(docs.not_utf8()))
@example(batch=[docs.fixed(b'"task":"h.ok","x":"\xff"')])
def test_not_utf8_after_id_and_reply_to(worker, batch):
    run(worker, batch)
