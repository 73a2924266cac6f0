-- Removes an address from one suppression list.
-- KEYS[1]: the list's zset; KEYS[2]: the list's hash
-- ARGV[1]: address
-- Returns 1 if it was there (expired or not), else 0.
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
