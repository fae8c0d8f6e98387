-- renew: extend our lease, only if it is still ours.  A lease that expired (and
-- was perhaps reaped) is lost: the supervisor must re-register, never silently
-- resume, so that a frozen host cannot write over what others did meanwhile.
--
-- KEYS[1]  <ns>:supervisor:<name>   (hash {epoch, info}; PEXPIRE)
-- KEYS[2]  <ns>:supervisors         (set; SADD name)
-- ARGV[1]  our epoch   ARGV[2] info JSON   ARGV[3] lease in ms   ARGV[4] name
-- Returns  1 if renewed, 0 if the lease is lost.
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before any
-- write: the script then refuses as a whole, naming it (lua/_check.lua).
--#include _check
local bad = check({KEYS[1], 'hash', KEYS[2], 'set'})
if bad then return bad end
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return 0
end
redis.call('HSET', KEYS[1], 'info', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SADD', KEYS[2], ARGV[4])
return 1
