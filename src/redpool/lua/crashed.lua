-- crashed: the pool process running a job died (killed, segfault, out of memory).
-- Count the crash; then either put the job back at the head of its queue to run
-- again, or -- once it has crashed more than --max-crashes times, whichever way it
-- was delivered -- leave it in the processing list for the worker to dead-letter
-- as a poison pill.  One atomic step.  The start of the run that crashed is kept
-- beside the count: a job dead-lettered later, by any worker, did run, and its
-- envelope's started_at says when.
--
-- KEYS[1]  <ns>:processing:<supervisor>:<queue>   (list; the job leaves it, unless poison)
-- KEYS[2]  <ns>:queue:<queue>                     (list; RPUSH to its head)
-- KEYS[3]  <ns>:crashes                           (hash; HINCRBY sha1(job), HSET
--                                                   sha1(job):started)
-- ARGV[1]  the raw job
-- ARGV[2]  --max-crashes
-- ARGV[3]  unix seconds when the crashed run started
-- Returns  the job's crash count (> ARGV[2]: a poison pill, still in the processing
--          list), or 0 if it was no longer ours (taken back by a reaper).
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before any
-- write: the script then refuses as a whole, naming it (lua/_check.lua).
--#include _check
local bad = check({KEYS[1], 'list', KEYS[2], 'list', KEYS[3], 'hash'})
if bad then return bad end
if not redis.call('LPOS', KEYS[1], ARGV[1]) then
  return 0
end
local sha = redis.sha1hex(ARGV[1])
local count = redis.call('HINCRBY', KEYS[3], sha, 1)
redis.call('HSET', KEYS[3], sha .. ':started', ARGV[3])
if count <= tonumber(ARGV[2]) then
  redis.call('LREM', KEYS[1], -1, ARGV[1])
  redis.call('RPUSH', KEYS[2], ARGV[1])
end
return count
