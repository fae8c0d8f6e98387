-- forget: the last step of reaping a dead supervisor on Redis Cluster, once every one
-- of its queues was reaped (reap_queue.lua): drop its name from the set of supervisors,
-- unless it registered again meanwhile.
--
-- KEYS[1]  {<ns>}:supervisor:<dead>   (hash; must not exist)
-- KEYS[2]  {<ns>}:supervisors         (set; SREM the name)
-- ARGV[1]  the dead supervisor's name
-- Returns  1 if forgotten, 0 if its lease is alive again.
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before any
-- write: the script then refuses as a whole, naming it (lua/_check.lua).
--#include _check
local bad = check({KEYS[2], 'set'})
if bad then return bad end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('SREM', KEYS[2], ARGV[1])
return 1
