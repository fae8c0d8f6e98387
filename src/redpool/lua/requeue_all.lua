-- requeue_all: empty one processing list back onto the head (right end) of its
-- queue in one atomic step, keeping the order jobs were taken in (the oldest
-- ends up rightmost, the next to be taken).
--
-- KEYS[1]  <ns>:processing:<supervisor>:<queue>   (list; emptied)
-- KEYS[2]  <ns>:queue:<queue>                     (list; jobs RPUSHed back)
-- Returns  the number of jobs moved.
local moved = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT') do
  moved = moved + 1
end
return moved
