-- requeue: put given jobs back at the head (right end) of their queues, in one
-- atomic step, so they are the next to be taken, in their original order.
-- A job no longer in the processing list is not pushed (it was requeued already).
--
-- KEYS (pairs, one pair per job, oldest job first):
--   KEYS[2j-1]  <ns>:processing:<supervisor>:<queue_j>   (list; the job leaves it)
--   KEYS[2j]    <ns>:queue:<queue_j>                     (list; RPUSH to its head)
-- ARGV[j]      the raw job
-- Returns      the number of jobs put back.
local moved = 0
-- newest first, so the oldest ends up rightmost: the next to be taken
for j = #ARGV, 1, -1 do
  if redis.call('LREM', KEYS[2 * j - 1], -1, ARGV[j]) > 0 then
    redis.call('RPUSH', KEYS[2 * j], ARGV[j])
    moved = moved + 1
  end
end
return moved
