-- register: claim a supervisor name with a new epoch, unless a lease holds it.
--
-- KEYS[1]  <ns>:supervisor:<name>   (hash {epoch, info}, with a TTL: the lease)
-- KEYS[2]  <ns>:supervisors         (set; SADD name)
-- ARGV[1]  new epoch   ARGV[2] info JSON   ARGV[3] lease in ms   ARGV[4] name
-- ARGV[5]  "" to claim only a free name, or the epoch of a holder we know is dead
--          (taken over only if that holder is still the one there)
-- Returns  {1} when claimed, or {0, holder info JSON or false} when held.
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before any
-- write: the script then refuses as a whole, naming it (lua/_check.lua).
--#include _check
local bad = check({KEYS[1], 'hash', KEYS[2], 'set'})
if bad then return bad end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch and epoch ~= ARGV[5] then
  return {0, redis.call('HGET', KEYS[1], 'info')}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'info', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return {1}
