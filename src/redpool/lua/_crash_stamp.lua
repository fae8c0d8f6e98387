-- Included (queue.script_source: a line "--#include _crash_stamp") by the scripts that
-- put a dead or restarted supervisor's jobs back: reap.lua, reap_queue.lua and
-- requeue_all.lua.  stamp(hash, job) counts one crash of the job and, unless a run's
-- start is known already (crashed.lua writes the exact one), records the script's own
-- time as '<sha1>:started': which held jobs had started cannot be known, and this is
-- the latest they can have (the failed envelope of a poison pill reports it).
local now = nil
local function stamp(hash, job)
  if not now then
    local t = redis.call('TIME')
    now = t[1] .. '.' .. string.format('%06d', tonumber(t[2]))
  end
  local sha = redis.sha1hex(job)
  redis.call('HINCRBY', hash, sha, 1)
  if not redis.call('HGET', hash, sha .. ':started') then  -- (HSETNX, with the commands
    redis.call('HSET', hash, sha .. ':started', now)      -- the worker's ACL grants)
  end
end
