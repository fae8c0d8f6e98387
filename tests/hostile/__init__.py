"""Issue 12's hostile suite ("no job, task or producer can crash, wedge or misuse a
worker"): hostile job documents (hand-picked, test_documents.py, and generated with
Hypothesis, test_corpus.py), misbehaving tasks (test_tasks.py), Redis keys of the wrong
type (test_keys.py), abusive producers (test_producers.py) and two supervisors sharing a
queue (test_two_supervisors.py), all against real daemons, each case followed by the
invariants of invariants.py.

A case that fails for want of a fix is a strict xfail naming its class (invariants.waiting):
when the fix lands the case XPASSes, which strict xfail reports as a failure, and the
marker goes.  Every class the issue named is fixed; what is still marked is a class the
suite found beyond it, not fixed yet (a task can SIGTERM its own supervisor).
"""
