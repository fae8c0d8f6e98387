-- reap: a supervisor's lease expired (its host died, froze, or lost Redis): put
-- every job in its processing lists back at the head of its queue, count a crash
-- for each, and unregister it -- one atomic step, so a job moves exactly once even
-- if two reapers race, and nothing happens if the supervisor renewed meanwhile.
-- Which of the jobs had started is not known here, so the time of this step is kept
-- as the start of a crashed run for those with none yet (sha1(job):started): a
-- job later dead-lettered as a poison pill may have run by then, and its envelope
-- must not say it never started.
--
-- KEYS[1]      <ns>:supervisor:<dead>      (hash; must not exist)
-- KEYS[2]      <ns>:supervisors            (set; SREM the dead name)
-- KEYS[3]      <ns>:crashes                (hash; HINCRBY sha1(job))
-- then pairs:
--   KEYS[2i+2] <ns>:processing:<dead>:<queue_i>   (list; emptied)
--   KEYS[2i+3] <ns>:queue:<queue_i>               (list; RPUSH to its head)
-- ARGV[1]      the dead supervisor's name
-- Returns      the number of jobs put back, or -1 if its lease is alive again.
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before any
-- write: the script then refuses as a whole, naming it (lua/_check.lua).
--#include _check
--#include _crash_stamp
if redis.call('EXISTS', KEYS[1]) == 1 then
  return -1
end
local bad = check(lists({KEYS[2], 'set', KEYS[3], 'hash'}, 4))
if bad then return bad end
local moved = 0
for i = 4, #KEYS, 2 do
  while true do
    local job = redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'LEFT', 'RIGHT')
    if not job then break end
    stamp(KEYS[3], job)
    moved = moved + 1
  end
end
redis.call('SREM', KEYS[2], ARGV[1])
return moved
