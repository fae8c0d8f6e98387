-- promote: move jobs that are due (delayed jobs, retries) from the scheduled sets
-- onto their queues.  Atomic, so with many supervisors promoting at once each job
-- moves exactly once.  "Due" is judged by the Redis server's clock, never a host's.
--
-- A key of the wrong type (another program wrote to it: keytypes.py) never stops the
-- script half way: a scheduled set is read with pcall, and a queue is asked its type
-- before a due job leaves the set for it.  Such a pair is passed over and reported.
--
-- then pairs:
--   KEYS[2i-1]  <ns>:scheduled:<queue_i>   (sorted set; score = due unix time, s)
--   KEYS[2i]    <ns>:queue:<queue_i>       (list; due jobs LPUSHed, like new jobs)
-- ARGV[1]       the most jobs to move per queue in one call
-- Returns       {jobs moved, ms until the next due job (-1: none scheduled),
--                {key, type, ...} of keys found of the wrong type}
--#include _check
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local limit = tonumber(ARGV[1])
local moved = 0
local next_due = nil
local broken = {}
for i = 1, #KEYS, 2 do
  local due = redis.pcall('ZRANGEBYSCORE', KEYS[i], '-inf', now, 'LIMIT', 0, limit)
  local bad = nil
  if due['err'] then
    bad = {KEYS[i], redis.call('TYPE', KEYS[i])['ok']}
  elseif #due > 0 then
    local qt = wrong(KEYS[i + 1], 'list')
    if qt then bad = {KEYS[i + 1], qt} end
  end
  if bad then
    broken[#broken + 1] = bad[1]
    broken[#broken + 1] = bad[2]
  else
    for _, job in ipairs(due) do
      redis.call('ZREM', KEYS[i], job)
      redis.call('LPUSH', KEYS[i + 1], job)
      moved = moved + 1
    end
    local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
    if first[2] then
      local s = tonumber(first[2])
      if not next_due or s < next_due then next_due = s end
    end
  end
end
if not next_due then return {moved, -1, broken} end
return {moved, math.max(0, math.floor((next_due - now) * 1000)), broken}
