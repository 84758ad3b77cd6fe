-- cachesync bloom_add: set the bits of one or more ids in a Bloom filter kept in one Redis string.
-- Only an existing filter is updated (a filter is created by a rebuild from the database, so it is never
-- partial); while a rebuild runs, the bits also go to the filter being built. The bits also always go to the
-- "added since the last swap" string, which the next rebuild ORs in: a rebuild from a table read taken before
-- this add (before the rebuild began) must not drop it (a false negative).
--
-- KEYS[1] = filter string, KEYS[2] = rebuild marker (a string holding the name of the filter being built),
-- KEYS[3] = ids added since the last swap
-- ARGV = bit offsets of every id (the caller hashes; k offsets per id)
--
-- Reply: 1 if the live filter exists (bits set), 0 if it does not (nothing to update until a rebuild)
local building = redis.call('GET', KEYS[2])
local live = redis.call('EXISTS', KEYS[1])
for i = 1, #ARGV do
  if live == 1 then redis.call('SETBIT', KEYS[1], ARGV[i], 1) end
  if building then redis.call('SETBIT', building, ARGV[i], 1) end
  redis.call('SETBIT', KEYS[3], ARGV[i], 1)
end
return live
