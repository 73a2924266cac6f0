-- KEYS: the enqueue's seven (ENQUEUE in redis.rs), then the guard's keys
-- ARGV: the enqueue's four (ENQUEUE), then the guard's arguments
-- Returns {allowed (1/0), the guard's reply}
local allowed, reply = guard(7)
if allowed then enqueue() end
return {allowed and 1 or 0, reply}
