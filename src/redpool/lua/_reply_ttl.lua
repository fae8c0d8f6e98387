-- Included (queue.script_source: a line "--#include _reply_ttl") by complete.lua and
-- reply.lua.  keep_for(key, length, ttl) gives a reply list, just pushed onto (LPUSH
-- returned length), the TTL a job asks for without ever shortening it.  Jobs may share
-- a reply list (a producer's one list for all its jobs): one asking for result_ttl 1
-- must not make another's answer, pushed a moment before to live an hour, vanish with
-- the list.  So the TTL only grows, as EXPIRE ... GT does on Redis 7.0+, done here in
-- two steps that 6.2 has too (one script: nothing comes between them): a list our push
-- created (length 1) gets the TTL; an older one only if it would live less long.  A
-- list that has no TTL although we did not create it is its owner's to keep: it keeps
-- none (for GT too, no TTL is the longest).  pcall: a refusal (an ACL user without
-- PTTL) leaves the TTL as it was, the longer side, and never fails the batch.
local function keep_for(key, length, ttl)
  if length ~= 1 then
    local left = redis.pcall('PTTL', key)
    if type(left) ~= 'number' or left < 0 or left >= ttl * 1000 then
      return
    end
  end
  redis.pcall('EXPIRE', key, ttl)
end
