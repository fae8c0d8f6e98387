-- complete: acknowledge a batch of finished jobs.  For each job, in one atomic step:
-- remove it from the processing list and, only if it was still there, write its
-- result envelope (result key and/or reply list), its dead-letter entry, and its
-- next attempt (a retry, due later).  A job therefore leaves Redis only together
-- with its result or its retry.  A job that is no longer in our processing list was
-- taken back (our lease expired and a reaper requeued it): we must not write
-- anything for it (fencing); it is counted instead.
--
-- KEYS[1]          <ns>:dead                       (list of dead-letter entries)
-- KEYS[2]          <ns>:crashes                    (hash; the job's count and start
--                                                  time are dropped)
-- then per job j (3 keys each, offset o = 2 + 3(j-1)):
--   KEYS[o+1]      <ns>:processing:<sup>:<queue>   (list; the job is removed from it)
--   KEYS[o+2]      <ns>:result:<id>, or ""         (string; SET with EX ttl)
--   KEYS[o+3]      <ns>:scheduled:<queue>, or ""   (sorted set; the retry, ZADD)
-- ARGV[1]          the dead-letter list's length cap (LTRIM)
-- ARGV[2]          TTL for reply lists when result_ttl is 0 (a reply list's TTL only
--                  grows: _reply_ttl.lua)
-- ARGV[3]          "<ns>:": a reply_to inside our namespace is skipped (it could be a
--                  queue, which LPUSH + EXPIRE would corrupt) ...
-- ARGV[4]          "<ns>:reply:": ... unless it is under this prefix
-- then per job j (7 args each, offset a = 4 + 7(j-1)):
--   ARGV[a+1]      the raw job, byte for byte as it sits in the processing list
--   ARGV[a+2]      result_ttl in seconds
--   ARGV[a+3]      the envelope JSON, or ""
--   ARGV[a+4]      the dead-letter entry JSON, or ""
--   ARGV[a+5]      the next attempt's raw job, or ""
--   ARGV[a+6]      its delay in milliseconds (due = Redis server time + delay); -1: the
--                  job is too large for the supervisor to have read it (oversized.py),
--                  and ARGV[a+1] names it as "<sha1hex> <length>" (lua/_by_hash.lua)
--   ARGV[a+7]      the reply_to list, or "" (LPUSH, then EXPIRE unless that would
--                  shorten its TTL).  A key the producer
--                  chose, passed as an argument rather than a key on purpose: the
--                  ACL check then happens at the LPUSH, inside pcall, so a reply_to
--                  the worker may not write is skipped (and counted) instead of
--                  refusing the whole batch, which would wedge the supervisor.
-- Returns          {jobs no longer in their processing list, replies skipped because
--                  the reply_to key held another type or was one of our own keys,
--                  {key, type, ...} of keys found of the wrong type, then the position
--                  (1-based) in the batch of each job no longer there, and minus the
--                  position of each job held back: only those were not written}.
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before a
-- job's first write, never after: the dead-letter list (once, if a job has an entry)
-- and the scheduled set (for a retry) are asked their type, and the job's removal from
-- its processing list is a pcall.  A job that needs such a key is held back, untouched
-- (it stays in its processing list), and the others of the batch are acknowledged.
-- Crash counts are dropped with a pcall (a key of another type holds none to drop).
local dead_cap = tonumber(ARGV[1])
--#include _by_hash
local reply_default_ttl = tonumber(ARGV[2])
local own, replies = ARGV[3], ARGV[4]
--#include _reply_ttl
local function ours(key)
  return string.sub(key, 1, #own) == own and string.sub(key, 1, #replies) ~= replies
end
local counted = redis.call('EXISTS', KEYS[2]) == 1
local now_ms = nil
local missing = 0
local out = {}
local skipped = 0
local dead_added = false
local broken = nil
local dead_bad = nil  -- the dead-letter list's wrong type, or false once known good
local jobs = (#KEYS - 2) / 3
for j = 1, jobs do
  local o = 2 + 3 * (j - 1)
  local a = 4 + 7 * (j - 1)
  local raw = ARGV[a + 1]
  local held = nil  -- the key of the wrong type this job needs
  if ARGV[a + 4] ~= '' then
    if dead_bad == nil then
      local t = redis.call('TYPE', KEYS[1])['ok']
      dead_bad = t ~= 'none' and t ~= 'list' and t
    end
    if dead_bad then held = {KEYS[1], dead_bad} end
  end
  if not held and ARGV[a + 5] ~= '' then
    local t = redis.call('TYPE', KEYS[o + 3])['ok']
    if t ~= 'none' and t ~= 'zset' then held = {KEYS[o + 3], t} end
  end
  local removed = 0
  if not held and ARGV[a + 6] == '-1' then  -- named by its hash: find it
    raw = by_hash(KEYS[o + 1], raw)
    if not raw then held = false end  -- (not there: counted as missing below)
  end
  if held == false then
    held = nil
  elseif not held then
    removed = type(raw) == 'table' and raw or redis.pcall('LREM', KEYS[o + 1], -1, raw)
    if type(removed) == 'table' then  -- WRONGTYPE: our processing list is not a list
      held = {KEYS[o + 1], redis.call('TYPE', KEYS[o + 1])['ok']}
    end
  end
  if held then
    broken = broken or {}
    broken[#broken + 1] = held[1]
    broken[#broken + 1] = held[2]
    out[#out + 1] = -j
  elseif removed == 0 then
    missing = missing + 1
    out[#out + 1] = j
  else
    local ttl = tonumber(ARGV[a + 2])
    local env = ARGV[a + 3]
    if env ~= '' then
      if KEYS[o + 2] ~= '' and ttl > 0 then
        redis.call('SET', KEYS[o + 2], env, 'EX', ttl)  -- (SET replaces a key of any type)
      end
      -- a reply_to naming a key that is not a list, or one the worker's ACL user may
      -- not write, must not fail the whole batch (a script error keeps the writes
      -- made before it): pcall, and skip that reply.
      local reply = ARGV[a + 7]
      if reply ~= '' and ours(reply) then
        skipped = skipped + 1
      elseif reply ~= '' then
        local pushed = redis.pcall('LPUSH', reply, env)
        if type(pushed) == 'table' and pushed['err'] then
          skipped = skipped + 1
        else
          keep_for(reply, pushed, ttl > 0 and ttl or reply_default_ttl)
        end
      end
    end
    if ARGV[a + 4] ~= '' then
      redis.call('LPUSH', KEYS[1], ARGV[a + 4])
      dead_added = true
    end
    if ARGV[a + 5] ~= '' then
      if not now_ms then
        local t = redis.call('TIME')
        now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
      end
      redis.call('ZADD', KEYS[o + 3], (now_ms + tonumber(ARGV[a + 6])) / 1000, ARGV[a + 5])
    end
    if counted then  -- (pcall: crash counts of another type hold none to drop)
      local sha = redis.sha1hex(raw)
      redis.pcall('HDEL', KEYS[2], sha, sha .. ':started')
    end
  end
end
if dead_added then
  redis.call('LTRIM', KEYS[1], 0, dead_cap - 1)
end
local reply = {missing, skipped, broken or {}}
for i = 1, #out do
  reply[i + 3] = out[i]
end
return reply
