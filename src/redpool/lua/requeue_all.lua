-- requeue_all: empty one processing list back onto the head (right end) of its
-- queue in one atomic step, keeping the order jobs were taken in (the oldest
-- ends up rightmost, the next to be taken).  With ARGV[1] = "1" each job's crash
-- count goes up: its supervisor died (or was found dead) while holding it.
-- Which of the jobs had started is not known here, so the time of this step is kept
-- as the start of a crashed run for those with none yet (sha1(job):started): a
-- job later dead-lettered as a poison pill may have run by then, and its envelope
-- must not say it never started.
--
-- KEYS[1]  <ns>:processing:<supervisor>:<queue>   (list; emptied)
-- KEYS[2]  <ns>:queue:<queue>                     (list; jobs RPUSHed back)
-- KEYS[3]  <ns>:crashes                           (hash; HINCRBY sha1(job) when counting)
-- ARGV[1]  "1" to count a crash for each job, "0" not to
-- Returns  the number of jobs moved.
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before any
-- write: the script then refuses as a whole, naming it (lua/_check.lua).
--#include _check
--#include _crash_stamp
local need = {KEYS[1], 'list', KEYS[2], 'list'}
if ARGV[1] == '1' then
  need[5], need[6] = KEYS[3], 'hash'
end
local bad = check(need)
if bad then return bad end
local moved = 0
while true do
  local job = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not job then break end
  if ARGV[1] == '1' then
    stamp(KEYS[3], job)
  end
  moved = moved + 1
end
return moved
