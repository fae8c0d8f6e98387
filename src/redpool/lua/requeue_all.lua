-- requeue_all: empty one processing list back onto the head (right end) of its
-- queue in one atomic step, keeping the order jobs were taken in (the oldest
-- ends up rightmost, the next to be taken).  With ARGV[1] = "1" each job's crash
-- count goes up: its supervisor died (or was found dead) while holding it.
--
-- KEYS[1]  <ns>:processing:<supervisor>:<queue>   (list; emptied)
-- KEYS[2]  <ns>:queue:<queue>                     (list; jobs RPUSHed back)
-- KEYS[3]  <ns>:crashes                           (hash; HINCRBY sha1(job) when counting)
-- ARGV[1]  "1" to count a crash for each job, "0" not to
-- Returns  the number of jobs moved.
local moved = 0
while true do
  local job = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not job then break end
  if ARGV[1] == '1' then
    redis.call('HINCRBY', KEYS[3], redis.sha1hex(job), 1)
  end
  moved = moved + 1
end
return moved
