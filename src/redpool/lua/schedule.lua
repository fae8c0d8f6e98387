-- schedule: add a job to run after a delay, measured on the Redis server's clock
-- (so producers on hosts with skewed clocks agree).
--
-- KEYS[1]  <ns>:scheduled:<queue>   (sorted set; ZADD due job)
-- ARGV[1]  delay in milliseconds    ARGV[2] the raw job
-- Returns  the due time (unix seconds, as a string)
local t = redis.call('TIME')
local due = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1]) / 1000
redis.call('ZADD', KEYS[1], due, ARGV[2])
return tostring(due)
