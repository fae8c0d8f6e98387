-- unregister: give a supervisor name back at an orderly exit, but only our own
-- lease: a successor that registered meanwhile (we had lost ours) keeps its own.
--
-- KEYS[1]  <ns>:supervisor:<name>   (hash {epoch, info}; deleted if the epoch is ours)
-- KEYS[2]  <ns>:supervisors         (set; SREM name, in the same case)
-- ARGV[1]  our epoch   ARGV[2] name
-- Returns  1 if unregistered, 0 if the lease was not ours.
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1
