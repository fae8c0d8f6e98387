-- A job too large for the supervisor to read (oversized.py) is named in a completion by
-- "<sha1hex> <length>" instead of its bytes.  by_hash(key, name): the element of the
-- list at key that it names (read here, in Redis, never sent to the supervisor), false
-- if none is, or the error (a table) when key is not a list.  Only an element of that
-- exact length is hashed; a processing list holds a few dozen jobs at most.
local function by_hash(key, name)
  local sha, size = string.match(name, '^(%x+) (%d+)$')
  size = tonumber(size)
  local n = redis.pcall('LLEN', key)
  if type(n) == 'table' then return n end
  for i = n - 1, 0, -1 do
    local el = redis.call('LINDEX', key, i)
    if el and #el == size and redis.sha1hex(el) == sha then return el end
  end
  return false
end
