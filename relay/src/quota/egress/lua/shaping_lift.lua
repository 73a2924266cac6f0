-- KEYS[1]: the site's response-rule states. ARGV: scope field. Returns 1 when a
-- state was there.
return redis.call('HDEL', KEYS[1], ARGV[1])
