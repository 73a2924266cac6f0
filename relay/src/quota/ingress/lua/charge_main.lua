-- The check alone: its keys and arguments start at KEYS[1] and ARGV[1].
local _, reply = guard(0)
return reply
