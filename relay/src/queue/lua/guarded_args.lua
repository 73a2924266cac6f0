-- A group of guarded enqueues: the guards' clock is ARGV[1] (read once, by
-- common.lua, before the first message); each message's guard arguments start
-- after its own, and A0 is moved to them before its guard runs.
local A0 = 0
