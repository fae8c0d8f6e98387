-- reserve: move up to N jobs from the queues, in strict priority order, into this
-- supervisor's processing lists.  The move is atomic: a job is always in exactly
-- one list, so a crash at any point loses nothing.  Nothing is taken by a
-- supervisor whose lease is lost (it must re-register first).  A batch costs two
-- commands per queue (RPOP with a count, LPUSH of them all), not two per job.
--
-- KEYS[1]      <ns>:supervisor:<name>   (hash; field epoch must equal ARGV[2])
-- KEYS[2]      <ns>:crashes             (hash; sha1(job) -> crashed deliveries)
-- then pairs, in priority order:
--   KEYS[2i+1] <ns>:queue:<name_i>                     (list; producers LPUSH)
--   KEYS[2i+2] <ns>:processing:<supervisor>:<name_i>   (list; this supervisor's)
-- ARGV[1]      N, the most jobs to take (at most a few thousand: unpack() limit)
-- ARGV[2]      our lease epoch
-- Returns      {1, counted, i, job, crashes, i, job, crashes, ...} (counted: 1 if any
--              job has a crash count at all; i: 1-based queue index; oldest job
--              first), or {0} when our lease is lost.  For a job that crashed before,
--              crashes is {count, started}: started is the unix time its last crashed
--              run started (a string), or "" when no start is known.
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[2] then
  return {0}
end
local n = tonumber(ARGV[1])
local counted = redis.call('EXISTS', KEYS[2]) == 1
local out = {1, counted and 1 or 0}
for i = 3, #KEYS, 2 do
  if n <= 0 then break end
  local jobs = redis.call('RPOP', KEYS[i], n)
  if jobs then
    redis.call('LPUSH', KEYS[i + 1], unpack(jobs))
    for _, job in ipairs(jobs) do
      local crashes = 0
      if counted then
        local sha = redis.sha1hex(job)
        crashes = tonumber(redis.call('HGET', KEYS[2], sha) or 0)
        if crashes > 0 then
          crashes = {crashes, redis.call('HGET', KEYS[2], sha .. ':started') or ''}
        end
      end
      out[#out + 1] = (i - 1) / 2
      out[#out + 1] = job
      out[#out + 1] = crashes
    end
    n = n - #jobs
  end
end
return out
