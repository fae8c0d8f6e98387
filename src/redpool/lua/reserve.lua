-- reserve: move up to N jobs from the queues, in strict priority order, into this
-- supervisor's processing lists.  The move is atomic: a job is always in exactly
-- one list, so a crash at any point loses nothing.  Nothing is taken by a
-- supervisor whose lease is lost (it must re-register first).  A batch costs at most
-- three commands per queue (LMOVE of the first job, then RPOP with a count and LPUSH of
-- the rest), not two per job.
--
-- A key of the wrong type (another program wrote to it: keytypes.py) never stops the
-- script half way, which would keep what it wrote before: the lease is read with pcall,
-- the crash counts' type is asked (TYPE, where EXISTS was), and each queue's first job
-- moves with LMOVE, which checks both lists before it writes anything.  A queue whose
-- list or processing list holds another type is passed over and reported; the rest of
-- a batch moves only once its lists are known to be lists.
--
-- KEYS[1]      <ns>:supervisor:<name>   (hash; field epoch must equal ARGV[2])
-- KEYS[2]      <ns>:crashes             (hash; sha1(job) -> crashed deliveries)
-- then pairs, in priority order:
--   KEYS[2i+1] <ns>:queue:<name_i>                     (list; producers LPUSH)
--   KEYS[2i+2] <ns>:processing:<supervisor>:<name_i>   (list; this supervisor's)
-- ARGV[1]      N, the most jobs to take (at most a few thousand: unpack() limit)
-- ARGV[2]      our lease epoch
-- ARGV[3]      optional: a job longer than this many bytes (far over --max-payload) is
--              not returned whole but as {length, its first ARGV[4] bytes, sha1hex,
--              its last ARGV[4] bytes (where reply_to may be)}: the
--              supervisor refuses it from that (oversized.py) and names it by hash when
--              it completes it, so its bytes never leave Redis (it stays whole in the
--              processing list meanwhile, as any job: a crash loses nothing)
-- ARGV[4]      the bytes kept of such a job (protocol.DEAD_JOB_KEPT)
-- Returns      {1, counted, i, job, crashes, i, job, crashes, ...} (counted: 1 if any
--              job has a crash count at all; i: 1-based queue index; oldest job
--              first), or {0} when our lease is lost.  For a job that crashed before,
--              crashes is {count, started}: started is the unix time its last crashed
--              run started (a string), or "" when no start is known.
--              When keys of the wrong type were found: {2, counted, {key, type, ...},
--              i, job, crashes, ...}; nothing of their queues moved (the lease's own key:
--              {2, 0, {key, type}}, nothing taken).
local broken = nil  -- {key, type, ...} of keys found of the wrong type
local function note(key)
  broken = broken or {}
  broken[#broken + 1] = key
  broken[#broken + 1] = redis.call('TYPE', key)['ok']
end
local epoch = redis.pcall('HGET', KEYS[1], 'epoch')
if type(epoch) == 'table' then  -- an error (HGET answers a string or false)
  note(KEYS[1])
  return {2, 0, broken}
end
if epoch ~= ARGV[2] then
  return {0}
end
local n = tonumber(ARGV[1])
local over, head = tonumber(ARGV[3]), tonumber(ARGV[4])
local crash_type = redis.call('TYPE', KEYS[2])['ok']
local counted = crash_type == 'hash'
if not counted and crash_type ~= 'none' then
  broken = {KEYS[2], crash_type}
end
local out = {1, counted and 1 or 0}
for i = 3, #KEYS, 2 do
  if n <= 0 then break end
  local jobs = redis.pcall('LMOVE', KEYS[i], KEYS[i + 1], 'RIGHT', 'LEFT')
  if type(jobs) == 'table' and not string.find(tostring(jobs.err), 'WRONGTYPE', 1, true) then
    -- refused for another reason (OOM, an ACL rule): not an empty queue.  Said as an
    -- error while nothing is moved yet; after a queue that gave jobs, those are
    -- returned as usual, and the refusal is met again at the next reserve.
    if #out == 2 then return redis.error_reply(tostring(jobs.err)) end
    break
  end
  if type(jobs) == 'table' then  -- WRONGTYPE: nothing moved; say which list
    for k = i, i + 1 do
      local t = redis.call('TYPE', KEYS[k])['ok']
      if t ~= 'none' and t ~= 'list' then note(KEYS[k]) end
    end
  elseif jobs then
    -- the first job moved, both keys are lists: the rest of the batch in two commands.
    -- (pcall: the move may have emptied the queue, and while a Redis Cluster slot
    -- migrates a key gone is "non local" to a script: an error after the move, which
    -- would leave that job in our list unreported.  An empty queue is all it means.)
    local rest = n > 1 and redis.pcall('RPOP', KEYS[i], n - 1)
    if type(rest) == 'table' and rest.err then rest = false end
    if rest then
      redis.call('LPUSH', KEYS[i + 1], unpack(rest))
      table.insert(rest, 1, jobs)
      jobs = rest
    else
      jobs = {jobs}
    end
    for _, job in ipairs(jobs) do
      local crashes = 0
      local sha = nil
      if counted then
        sha = redis.sha1hex(job)
        crashes = tonumber(redis.call('HGET', KEYS[2], sha) or 0)
        if crashes > 0 then
          crashes = {crashes, redis.call('HGET', KEYS[2], sha .. ':started') or ''}
        end
      end
      if over and #job > over then
        job = {#job, string.sub(job, 1, head), sha or redis.sha1hex(job),
               string.sub(job, -head)}
      end
      out[#out + 1] = (i - 1) / 2
      out[#out + 1] = job
      out[#out + 1] = crashes
    end
    n = n - #jobs
  end
end
if broken then
  out[1] = 2
  table.insert(out, 3, broken)
end
return out
