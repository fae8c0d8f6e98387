"""Issue 12's hostile suite ("no job, task or producer can crash, wedge or misuse a
worker"): hostile job documents (hand-picked, test_documents.py, and generated with
Hypothesis, test_corpus.py), misbehaving tasks (test_tasks.py), Redis keys of the wrong
type (test_keys.py), abusive producers (test_producers.py) and two supervisors sharing a
queue (test_two_supervisors.py), all against real daemons, each case followed by the
invariants of invariants.py.

A case that fails until a fix is merged is a strict xfail naming the class, numbered as
the issue's classes are here:

  §1  decode side: lone surrogates in task/reply_to, NaN/1e400, nesting depth, invalid
      UTF-8 salvage (branch h-decode)
  §2  encode side: lone surrogates and unencodable results and exceptions,
      --max-result-size / ResultTooLarge, the envelope's "warnings" (h-encode)
  §3  Redis keys of the wrong type (WRONGTYPE) (h-wrongtype)
  §4  process death seen through a pidfd, tasks that fork or close fds, pipe deadlock
      (h-process)
  §5  reply_to only under <ns>:reply:* and --reply-to patterns (h-reply)
  §6  secrets (h-secrets)

Once the branch is merged the case XPASSes, which strict xfail reports as a failure:
remove its marker then.  Classes that no branch fixes yet say so.
"""
