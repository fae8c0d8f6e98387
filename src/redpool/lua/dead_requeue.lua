-- dead_requeue: give dead-letter entries' jobs a fresh attempt.  For each entry, in one
-- atomic step: remove the exact entry bytes from the dead-letter list and, only if they
-- were there, LPUSH the raw job onto the left end (the tail) of its queue, behind the
-- work already waiting.  An entry that is gone (requeued or purged by another operator
-- since the caller read it) pushes nothing, so no entry is ever requeued twice.
-- Identical copies of one entry are all removed, and the job is pushed once per copy.
--
-- KEYS[1]      <ns>:dead                 (list of dead-letter entries; entries leave it)
-- KEYS[j+1]    <ns>:queue:<queue_j>      (list; the raw job of entry j is LPUSHed)
-- ARGV[2j-1]   entry j, byte for byte as it sits in the dead-letter list
-- ARGV[2j]     its raw job (the caller decodes job_b64: these are the original bytes)
-- Returns      an array: for each entry j, how many copies were removed (0: gone).
--
-- A key of the wrong type (another program wrote to it: keytypes.py) is found before any
-- write: the script then refuses as a whole, naming it (lua/_check.lua).
--#include _check
local bad = check(lists({}, 1))
if bad then return bad end
local out = {}
for j = 1, #KEYS - 1 do
  local n = redis.call('LREM', KEYS[1], 0, ARGV[2 * j - 1])
  for _ = 1, n do
    redis.call('LPUSH', KEYS[j + 1], ARGV[2 * j])
  end
  out[j] = n
end
return out
