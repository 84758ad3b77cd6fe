-- cachesync bloom_rebuild: the two atomic steps of rebuilding a Bloom filter from the database.
--
-- KEYS[1] = live filter, KEYS[2] = filter being built, KEYS[3] = rebuild marker, KEYS[4] = scratch key,
-- KEYS[5] = ids added since the last swap (see bloom_add.lua)
-- ARGV[1] = "begin": point the marker at KEYS[2] (so concurrent bloom_add calls also set bits there) for
--           ARGV[2] ms, and start KEYS[2] empty
--         = "swap": OR the bits built by the caller (ARGV[2], the whole bit string) and KEYS[5] into KEYS[2],
--           RENAME it over the live filter, drop the marker, the scratch key and KEYS[5]
--
-- Reply: 1, or 0 for "swap" when the marker no longer names KEYS[2] (the rebuild expired or was superseded)
if ARGV[1] == 'begin' then
  redis.call('DEL', KEYS[2])
  redis.call('SET', KEYS[3], KEYS[2], 'PX', ARGV[2])
  return 1
end
if redis.call('GET', KEYS[3]) ~= KEYS[2] then
  redis.call('DEL', KEYS[2], KEYS[4])
  return 0
end
redis.call('SET', KEYS[4], ARGV[2])
redis.call('BITOP', 'OR', KEYS[2], KEYS[2], KEYS[4], KEYS[5])
redis.call('RENAME', KEYS[2], KEYS[1])
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
return 1
