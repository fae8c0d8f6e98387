-- fence: a supervisor's lease epoch for one queue, kept in the queue's slot (Redis
-- Cluster only), where reserve.lua checks it and reap_queue.lua looks for it: the
-- lease hash <ns>:supervisor:<name> lives in another slot, out of a script's reach.
-- Written at registration, renewed with the lease, dropped at an orderly exit.
--
-- KEYS[1]  <ns>:lease:<sup>:{q}   (hash {epoch}, with the lease's TTL)
-- ARGV[1]  "set": write our epoch (a new registration replaces any other);
--          "renew": extend it only if the epoch is ours;
--          "drop": delete it only if the epoch is ours
-- ARGV[2]  our epoch   ARGV[3] the lease in ms
-- Returns  1 if done, 0 if the fence is not ours (lost: expired, or taken over)
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before any
-- write: the script then refuses as a whole, naming it (lua/_check.lua).
--#include _check
local bad = check({KEYS[1], 'hash'})
if bad then return bad end
if ARGV[1] == 'set' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'epoch', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then
  return 0
end
if ARGV[1] == 'renew' then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
else
  redis.call('DEL', KEYS[1])
end
return 1
