-- cachesync bloom_add: set the bits of one or more ids in a Bloom filter kept in one Redis string.
-- Only an existing filter is updated (a filter is created by a rebuild from the database, so it is never
-- partial); while a rebuild runs, the bits also go to the filter being built.
--
-- KEYS[1] = filter string, KEYS[2] = rebuild marker (a string holding the name of the filter being built)
-- ARGV = bit offsets of every id (the caller hashes; k offsets per id)
--
-- Reply: 1 if the live filter exists (bits set), 0 if it does not (nothing to update until a rebuild)
local building = redis.call('GET', KEYS[2])
local live = redis.call('EXISTS', KEYS[1])
for i = 1, #ARGV do
  if live == 1 then redis.call('SETBIT', KEYS[1], ARGV[i], 1) end
  if building then redis.call('SETBIT', building, ARGV[i], 1) end
end
return live
