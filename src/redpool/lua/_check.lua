-- Included (queue.script_source: a line "--#include _check") by the scripts that write
-- (the hot ones, reserve.lua and complete*.lua, do the same inline, without the cost of
-- these closures): a key of ours that another program filled with another type (SET on
-- a queue list, say) must be found before the first write.  Redis does not roll a script back,
-- so an error after a write keeps that write: a job removed from one list and never
-- pushed onto the next would be lost.  (keytypes.py explains the whole policy.)
--
-- wrong(key, want): the type the key holds if it is neither absent nor `want`, else nil.
-- refuse(key, t, want): the error a script returns instead of running, naming the key
-- (keytypes.culprit reads it back): "WRONGTYPE redpool key <key> holds a <t>, not a <want>".
-- check({key, want, key, want, ...}): refuse() for the first such key, or nil.
-- lists(need, from): ``need`` with KEYS[from], KEYS[from + 1], ... each wanted a list.
local function wrong(key, want)
  local t = redis.call('TYPE', key)['ok']
  if t == 'none' or t == want then return nil end
  return t
end
local function refuse(key, t, want)
  return redis.error_reply('WRONGTYPE redpool key ' .. key .. ' holds a ' .. t .. ', not a ' .. want)
end
local function check(list)
  for i = 1, #list, 2 do
    local t = wrong(list[i], list[i + 1])
    if t then return refuse(list[i], t, list[i + 1]) end
  end
  return nil
end
local function lists(need, from)
  for i = from, #KEYS do
    need[#need + 1] = KEYS[i]
    need[#need + 1] = 'list'
  end
  return need
end
