-- crashed: the pool process running a job died (killed, segfault, out of memory).
-- Put the job back at the head of its queue and count the crash, in one step; a
-- job whose count passes --max-crashes is dead-lettered by the worker instead.
--
-- KEYS[1]  <ns>:processing:<supervisor>:<queue>   (list; the job leaves it)
-- KEYS[2]  <ns>:queue:<queue>                     (list; RPUSH to its head)
-- KEYS[3]  <ns>:crashes                           (hash; HINCRBY sha1(job))
-- ARGV[1]  the raw job
-- Returns  the job's crash count, or 0 if it was no longer ours (taken back).
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[1])
return redis.call('HINCRBY', KEYS[3], redis.sha1hex(ARGV[1]), 1)
