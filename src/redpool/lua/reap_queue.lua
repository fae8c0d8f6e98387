-- reap_queue: reap.lua for Redis Cluster, one queue of a dead supervisor at a time (in
-- the queue's slot): if its fence for this queue expired too, put every job of its
-- processing list back at the head of the queue and count a crash for each -- one
-- atomic step, so a job moves exactly once even if two reapers race, and nothing
-- moves if the supervisor registered again meanwhile (a new fence).  Its outbox (answers
-- it accepted but had not written) is delivered by the reaper afterwards.
-- Which of the jobs had started is not known here, so the time of this step is kept
-- as the start of a crashed run for those with none yet (sha1(job):started): a
-- job later dead-lettered as a poison pill may have run by then, and its envelope
-- must not say it never started.
--
-- KEYS[1]  <ns>:lease:<dead>:{q}         (hash; must not exist)
-- KEYS[2]  <ns>:processing:<dead>:{q}    (list; emptied)
-- KEYS[3]  <ns>:queue:{q}                (list; RPUSH to its head)
-- KEYS[4]  <ns>:crashes:{q}              (hash; HINCRBY sha1(job))
-- Returns  the number of jobs put back, or -1 if the fence is alive.
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before any
-- write: the script then refuses as a whole, naming it (lua/_check.lua).
--#include _check
--#include _crash_stamp
if redis.call('EXISTS', KEYS[1]) == 1 then
  return -1
end
local bad = check({KEYS[2], 'list', KEYS[3], 'list', KEYS[4], 'hash'})
if bad then return bad end
local moved = 0
while true do
  local job = redis.call('LMOVE', KEYS[2], KEYS[3], 'LEFT', 'RIGHT')
  if not job then break end
  stamp(KEYS[4], job)
  moved = moved + 1
end
return moved
