-- reply: push a result envelope onto a reply list and give the list its TTL, in one
-- step (Redis Cluster: the list lives in a slot of its own, so complete_cluster.lua
-- cannot; cluster.py sends this right after).  The TTL only ever grows (_reply_ttl.lua):
-- a job asking for a short one cannot cut short the answers of others sharing the list.
-- A key that holds another type is left as it is, TTL included: the producer named the
-- wrong key, and its data is not ours to expire.
--
-- KEYS[1]  the job's reply_to                       (list; LPUSH, PTTL, EXPIRE)
-- ARGV[1]  the envelope JSON   ARGV[2] the list's TTL in seconds
-- Returns  1 if pushed, 0 if the key holds another type; any other error is raised.
--#include _reply_ttl
local pushed = redis.pcall('LPUSH', KEYS[1], ARGV[1])
if type(pushed) == 'table' and pushed['err'] then
  if string.find(pushed['err'], 'WRONGTYPE', 1, true) then
    return 0
  end
  return pushed
end
keep_for(KEYS[1], pushed, tonumber(ARGV[2]))
return 1
