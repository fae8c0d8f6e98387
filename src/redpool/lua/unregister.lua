-- unregister: give a supervisor name back at an orderly exit, but only our own
-- lease: a successor that registered meanwhile (we had lost ours) keeps its own.
--
-- KEYS[1]  <ns>:supervisor:<name>   (hash {epoch, info}; deleted if the epoch is ours)
-- KEYS[2]  <ns>:supervisors         (set; SREM name, in the same case)
-- ARGV[1]  our epoch   ARGV[2] name
-- Returns  1 if unregistered, 0 if the lease was not ours.
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before any
-- write: the script then refuses as a whole, naming it (lua/_check.lua).
--#include _check
local bad = check({KEYS[1], 'hash', KEYS[2], 'set'})
if bad then return bad end
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
