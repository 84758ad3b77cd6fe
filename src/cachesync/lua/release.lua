-- cachesync release: give up a lease without filling (the loader failed),
-- so that waiters retry at once instead of waiting for the lease deadline.
--
-- KEYS: for each key i, KEYS[2i-1] = entry hash, KEYS[2i] = wake list
-- ARGV[1] = lease token, ARGV[2] = wake list TTL in ms
--
-- Reply: the number of leases released.
local n = 0
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local f = redis.call('HMGET', k, 'lt', 'w')
  if f[1] == ARGV[1] then
    redis.call('HDEL', k, 'lt', 'ld', 'w')
    n = n + 1
    if f[2] and tonumber(f[2]) > 0 then
      for _ = 1, tonumber(f[2]) do redis.call('RPUSH', KEYS[i + 1], '0') end
      redis.call('PEXPIRE', KEYS[i + 1], tonumber(ARGV[2]))
    end
  end
end
return n
