-- cachesync peek: the raw fields of an entry hash, without side effects.
--
-- KEYS[1] = entry hash
-- Reply: a flat array field, value, field, value ... (empty when absent).
return redis.call('HGETALL', KEYS[1])
