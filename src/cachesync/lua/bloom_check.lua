-- cachesync bloom_check: might these ids be in the Bloom filter?
--
-- KEYS[1] = filter string
-- ARGV[1] = k (bit offsets per id), ARGV[2..] = the bit offsets, k per id, ids in order
--
-- Reply: -1 if the filter does not exist (the caller must treat every id as "maybe"), otherwise an array
-- with one integer per id: 1 = maybe present, 0 = certainly absent
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local k = tonumber(ARGV[1])
local out = {}
for i = 2, #ARGV, k do
  local hit = 1
  for j = i, i + k - 1 do
    if redis.call('GETBIT', KEYS[1], ARGV[j]) == 0 then hit = 0; break end
  end
  out[#out + 1] = hit
end
return out
