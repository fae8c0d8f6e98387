-- narrow: an outbox entry whose answer was written in part (its result key, not its
-- reply, or the other way round: a node away), replaced by what is left to write, so
-- that no later delivery -- the same reaper's next round, or another supervisor's,
-- which knows nothing of this one -- writes a part twice (a reply pushed twice).
-- Only if the entry is still there: a deliverer that raced us and removed it has
-- written it whole.
--
-- KEYS[1]  <ns>:outbox:<sup>:{q}   (list)
-- ARGV[1]  the entry as it is
-- ARGV[2]  the entry with the parts written emptied (cluster_reaper.py)
-- Returns  1 if replaced, 0 if the entry was gone.
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before any
-- write: the script then refuses as a whole, naming it (lua/_check.lua).
--#include _check
local bad = check({KEYS[1], 'list'})
if bad then return bad end
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then
  return 0
end
redis.call('RPUSH', KEYS[1], ARGV[2])
return 1
