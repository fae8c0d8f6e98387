-- complete: acknowledge a batch of finished jobs.  For each job, in one atomic step:
-- remove it from the processing list and, only if it was still there, write its
-- result envelope (result key and/or reply list) and its dead-letter entry.
-- A job therefore leaves Redis only together with its result.  A job that is no
-- longer in our processing list was taken back (our lease expired and a reaper
-- requeued it): we must not write a result for it (fencing); it is counted.
--
-- KEYS[1]          <ns>:dead                       (list of dead-letter entries)
-- then per job j (3 keys each, offset o = 1 + 3(j-1)):
--   KEYS[o+1]      <ns>:processing:<sup>:<queue>   (list; the job is removed from it)
--   KEYS[o+2]      <ns>:result:<id>, or ""         (string; SET with EX ttl)
--   KEYS[o+3]      reply_to list, or ""            (list; LPUSH + EXPIRE)
-- ARGV[1]          the dead-letter list's length cap (LTRIM)
-- ARGV[2]          TTL for reply lists when result_ttl is 0
-- ARGV[3]          "<ns>:": a reply_to inside our namespace is skipped (it could be a
--                  queue, which LPUSH + EXPIRE would corrupt) ...
-- ARGV[4]          "<ns>:reply:": ... unless it is under this prefix
-- then per job j (4 args each, offset a = 4 + 4(j-1)):
--   ARGV[a+1]      the raw job, byte for byte as it sits in the processing list
--   ARGV[a+2]      result_ttl in seconds
--   ARGV[a+3]      the envelope JSON, or ""
--   ARGV[a+4]      the dead-letter entry JSON, or ""
-- Returns          {jobs no longer in their processing list, replies skipped because
--                  the reply_to key held another type or was one of our own keys}.
local dead_cap = tonumber(ARGV[1])
local reply_default_ttl = tonumber(ARGV[2])
local own, replies = ARGV[3], ARGV[4]
local function ours(key)
  return string.sub(key, 1, #own) == own and string.sub(key, 1, #replies) ~= replies
end
local missing = 0
local skipped = 0
local dead_added = false
local jobs = (#KEYS - 1) / 3
for j = 1, jobs do
  local o = 1 + 3 * (j - 1)
  local a = 4 + 4 * (j - 1)
  local removed = redis.call('LREM', KEYS[o + 1], -1, ARGV[a + 1])
  if removed == 0 then
    missing = missing + 1
  else
    local ttl = tonumber(ARGV[a + 2])
    local env = ARGV[a + 3]
    if env ~= '' then
      if KEYS[o + 2] ~= '' and ttl > 0 then
        redis.call('SET', KEYS[o + 2], env, 'EX', ttl)
      end
      -- a reply_to naming a key that is not a list must not fail the whole batch
      -- (a script error keeps the writes made before it): pcall, and skip that reply.
      if KEYS[o + 3] ~= '' and ours(KEYS[o + 3]) then
        skipped = skipped + 1
      elseif KEYS[o + 3] ~= '' then
        local pushed = redis.pcall('LPUSH', KEYS[o + 3], env)
        if type(pushed) == 'table' and pushed['err'] then
          skipped = skipped + 1
        elseif ttl > 0 then
          redis.call('EXPIRE', KEYS[o + 3], ttl)
        else
          redis.call('EXPIRE', KEYS[o + 3], reply_default_ttl)
        end
      end
    end
    if ARGV[a + 4] ~= '' then
      redis.call('LPUSH', KEYS[1], ARGV[a + 4])
      dead_added = true
    end
  end
end
if dead_added then
  redis.call('LTRIM', KEYS[1], 0, dead_cap - 1)
end
return {missing, skipped}
