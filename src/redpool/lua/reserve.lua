-- reserve: move up to N jobs from the queues, in strict priority order, into this
-- supervisor's processing lists.  The move is atomic: a job is always in exactly
-- one list, so a crash at any point loses nothing.
--
-- KEYS (pairs, in priority order):
--   KEYS[2i-1]  <ns>:queue:<name_i>                     (list; producers LPUSH)
--   KEYS[2i]    <ns>:processing:<supervisor>:<name_i>   (list; this supervisor's)
-- ARGV[1]      N, the most jobs to take
-- Returns      a flat array {i, job, i, job, ...}: i is the 1-based queue index.
local n = tonumber(ARGV[1])
local out = {}
for i = 1, #KEYS, 2 do
  while n > 0 do
    local job = redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'RIGHT', 'LEFT')
    if not job then break end
    out[#out + 1] = (i + 1) / 2
    out[#out + 1] = job
    n = n - 1
  end
  if n <= 0 then break end
end
return out
