-- A guarded enqueue: the guard's arguments follow the enqueue's four (ENQUEUE_ARGV
-- in redis.rs), so that neither list is copied.
local A0 = 4
