-- processing: what one of our processing lists holds, for a reconcile (after a lost
-- reply or an outage) or a restore (after Redis lost its data).  A job far over
-- --max-payload (oversized.py) is never sent whole: it is returned as reserve.lua
-- returns it, {length, its first ARGV[2] bytes, sha1hex, its last ARGV[2] bytes}, and
-- the supervisor names it by hash when it puts it back (requeue.lua, _by_hash.lua).
-- Read one element at a time (LINDEX), so the script holds at most one job too.
--
-- KEYS[1]      <ns>:processing:<supervisor>:<queue>   (list)
-- ARGV[1]      a job longer than this many bytes is cut (0: none is)
-- ARGV[2]      the bytes kept of such a job at each end (protocol.DEAD_JOB_KEPT)
-- Returns      its elements, in LRANGE order (newest first), each whole or cut.
--              A key of another type: the WRONGTYPE error, as LRANGE would say.
local over, head = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = redis.call('LLEN', KEYS[1])
local out = {}
for i = 0, n - 1 do
  local el = redis.call('LINDEX', KEYS[1], i)
  if over > 0 and #el > over then
    el = {#el, string.sub(el, 1, head), redis.sha1hex(el), string.sub(el, -head)}
  end
  out[#out + 1] = el
end
return out
