-- requeue: put given jobs back at the head (right end) of their queues, in one
-- atomic step, so they are the next to be taken, in their original order.
-- A job no longer in the processing list is not pushed (it was requeued already).
--
-- KEYS (pairs, one pair per job, oldest job first):
--   KEYS[2j-1]  <ns>:processing:<supervisor>:<queue_j>   (list; the job leaves it)
--   KEYS[2j]    <ns>:queue:<queue_j>                     (list; RPUSH to its head)
-- ARGV[1]      the positions j (1-based, space-separated; "" if none) of jobs named
--              by hash: too large for the supervisor to have read (oversized.py), such
--              a job's argument is "<sha1hex> <length>" (lua/_by_hash.lua), found here
-- ARGV[j+1]    the raw job (or its name, as above)
-- Returns      {the number of jobs put back, {key, type, ...} of keys found of the
--              wrong type}.
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before a
-- job's first write: each list is asked its type once, and a job whose processing list
-- or queue holds another type stays where it is (in our processing list: the next
-- reconcile, or recovery at our next start, puts it back once the key is fixed).
--#include _check
--#include _by_hash
local named = {}
for j in string.gmatch(ARGV[1], '%d+') do named[tonumber(j)] = true end
local moved = 0
local seen, broken = {}, {}
local function usable(key)
  if seen[key] == nil then
    local t = wrong(key, 'list')
    seen[key] = not t
    if t then
      broken[#broken + 1] = key
      broken[#broken + 1] = t
    end
  end
  return seen[key]
end
-- newest first, so the oldest ends up rightmost: the next to be taken
for j = #ARGV - 1, 1, -1 do
  if usable(KEYS[2 * j - 1]) and usable(KEYS[2 * j]) then
    local job = ARGV[j + 1]
    if named[j] then job = by_hash(KEYS[2 * j - 1], job) end  -- (a list: never an error)
    if job and redis.call('LREM', KEYS[2 * j - 1], -1, job) > 0 then
      redis.call('RPUSH', KEYS[2 * j], job)
      moved = moved + 1
    end
  end
end
return {moved, broken}
