-- complete_cluster: complete.lua for Redis Cluster, for the jobs of ONE queue (every key
-- here carries the queue's hash tag: one slot).  For each job, in one atomic step:
-- remove it from the processing list and, only if it was still there, put its answer
-- on the outbox, its dead-letter entry on the queue's dead list, its next attempt on
-- the queue's scheduled set, and drop its crash count.  The result key and the reply
-- list live in other slots, so the supervisor writes them next, from the outbox, and
-- then removes those entries (cluster.py, deliver()).  A job therefore leaves Redis
-- only with its answer in the outbox, and a job no longer ours (fencing: a reaper took
-- it back) writes nothing; it is counted instead.
--
-- KEYS[1]      <ns>:processing:<sup>:{q}   (list; the job is removed from it)
-- KEYS[2]      <ns>:outbox:<sup>:{q}       (list; RPUSH of the answer)
-- KEYS[3]      <ns>:dead:{q}               (list of dead-letter entries; LPUSH, LTRIM)
-- KEYS[4]      <ns>:crashes:{q}            (hash; the job's count and start time
--                                           are dropped)
-- KEYS[5]      <ns>:scheduled:{q}          (sorted set; the retry, ZADD)
-- ARGV[1]      the dead-letter list's length cap
-- ARGV[2]      D: how many answers of earlier calls were delivered since (cluster.py
--              removes them here, in the round trip it makes anyway)
-- ARGV[3..2+D] those outbox entries, removed by value (LREM 1 each: a reaper that
--              delivered one too, racing us, cannot make us drop another)
-- then per job j (5 args each, offset a = 2 + D + 5(j-1)):
--   ARGV[a+1]  the raw job, byte for byte as it sits in the processing list
--   ARGV[a+2]  the outbox entry (JSON [result key, ttl, reply_to, envelope]), or ""
--   ARGV[a+3]  the dead-letter entry JSON, or ""
--   ARGV[a+4]  the next attempt's raw job, or ""
--   ARGV[a+5]  its delay in milliseconds (due = Redis server time + delay); -1: the job
--              is too large for the supervisor to have read it (oversized.py), and
--              ARGV[a+1] names it as "<sha1hex> <length>" (lua/_by_hash.lua)
-- Returns      {jobs no longer in the processing list, the entries this call pushed
--              onto the outbox (older ones a failed write left there are cluster.py's
--              housekeeping's, so that a node away does not make every call heavier),
--              {key, type, ...} of keys found of the wrong type, then the position
--              (1-based) in the batch of each job no longer there, and minus the
--              position of each job held back}
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before a
-- job's first write, as in complete.lua: the outbox is asked its type first (it is
-- written before any job is looked at), the dead-letter list and the scheduled set when
-- a job needs them, and the removal from the processing list is a pcall.  A job that
-- needs such a key is held back, untouched; the others are acknowledged.
local function wrong(key, want)  -- (lua/_check.lua's)
  local t = redis.call('TYPE', key)['ok']
  return t ~= 'none' and t ~= want and t
end
--#include _by_hash
local counted = redis.call('EXISTS', KEYS[4]) == 1
local now_ms = nil
local missing = 0
local out = {}
local dead_added = false
local pushed = {}
local broken = {}
local box_bad = wrong(KEYS[2], 'list')
local dead_bad, sched_bad = nil, nil  -- their wrong type, or false once known good
local delivered = tonumber(ARGV[2])
-- While a Redis Cluster slot migrates, a key this script empties (deletes) cannot be
-- touched again: it is "non local", an error half way.  So the delivered answers leave
-- the outbox last, after the pushes, and neither the outbox nor the processing list
-- is touched once its length, taken first, says it is empty.  (Every key exists when such a script runs:
-- the node answers TRYAGAIN otherwise.)
local proc_left = redis.pcall('LLEN', KEYS[1])
if type(proc_left) ~= 'number' then proc_left = nil end  -- WRONGTYPE: the pcall below says
for a = 2 + delivered, #ARGV - 1, 5 do
  local raw = ARGV[a + 1]
  local j = (a - 2 - delivered) / 5 + 1
  local held = nil
  if ARGV[a + 2] ~= '' and box_bad then held = {KEYS[2], box_bad} end
  if not held and ARGV[a + 3] ~= '' then
    if dead_bad == nil then dead_bad = wrong(KEYS[3], 'list') or false end
    if dead_bad then held = {KEYS[3], dead_bad} end
  end
  if not held and ARGV[a + 4] ~= '' then
    if sched_bad == nil then sched_bad = wrong(KEYS[5], 'zset') or false end
    if sched_bad then held = {KEYS[5], sched_bad} end
  end
  local removed = 0
  if not held and proc_left ~= 0 and ARGV[a + 5] == '-1' then  -- named by its hash: find it
    raw = by_hash(KEYS[1], raw)
    if not raw then held = false end  -- (not there: counted as missing below)
  end
  if held == false then
    held = nil
  elseif not held and proc_left ~= 0 then
    removed = type(raw) == 'table' and raw or redis.pcall('LREM', KEYS[1], -1, raw)
    if type(removed) == 'table' then  -- WRONGTYPE: our processing list is not a list
      held = {KEYS[1], redis.call('TYPE', KEYS[1])['ok']}
    elseif proc_left then
      proc_left = proc_left - removed
    end
  end
  if held then
    broken[#broken + 1] = held[1]
    broken[#broken + 1] = held[2]
    out[#out + 1] = -j
  elseif removed == 0 then
    missing = missing + 1
    out[#out + 1] = j
  else
    if ARGV[a + 2] ~= '' then
      redis.call('RPUSH', KEYS[2], ARGV[a + 2])
      pushed[#pushed + 1] = ARGV[a + 2]
    end
    if ARGV[a + 3] ~= '' then
      redis.call('LPUSH', KEYS[3], ARGV[a + 3])
      dead_added = true
    end
    if ARGV[a + 4] ~= '' then
      if not now_ms then
        local t = redis.call('TIME')
        now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      redis.call('ZADD', KEYS[5], (now_ms + tonumber(ARGV[a + 5])) / 1000, ARGV[a + 4])
    end
    if counted then  -- (pcall: crash counts of another type hold none to drop)
      local sha = redis.sha1hex(raw)
      redis.pcall('HDEL', KEYS[4], sha, sha .. ':started')
    end
  end
end
if dead_added then
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[1]) - 1)
end
if not box_bad and delivered > 0 then
  -- not once they have emptied it (an entry a reaper removed already, one delivered
  -- twice): the emptied outbox would be "non local" now, an error after our writes
  local box_left = redis.call('LLEN', KEYS[2])
  for i = 3, 2 + delivered do
    if box_left == 0 then break end
    box_left = box_left - redis.call('LREM', KEYS[2], 1, ARGV[i])
  end
end
if box_bad and #broken == 0 then
  broken = {KEYS[2], box_bad}
end
local reply = {missing, pushed, broken}
for i = 1, #out do
  reply[i + 3] = out[i]
end
return reply
