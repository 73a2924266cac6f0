-- Names of the suppression lists that ever had an entry.
-- KEYS[1]: set of list names
return redis.call('SMEMBERS', KEYS[1])
