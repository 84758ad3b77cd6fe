-- cachesync release: give up a lease without filling (the loader failed),
-- so that waiters retry at once instead of waiting for the lease deadline.
--
-- KEYS: for each key i, KEYS[2i-1] = entry hash, KEYS[2i] = wake list
-- ARGV[1] = lease token, ARGV[2] = wake list TTL in ms
--
-- Reply: the number of leases released.
local function bad_ms(x) return not x or x ~= x or x <= 0 or x > 1e13 end  -- NaN fails x == x
local wake_ms = tonumber(ARGV[2])
if bad_ms(wake_ms) or ARGV[1] == '' then
  return redis.error_reply('ERR cachesync release.lua: bad arguments (token, wake ms)')
end
local n = 0
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local f = redis.pcall('HMGET', k, 'lt', 'w')
  if not f.err and f[1] == ARGV[1] then
    redis.call('HDEL', k, 'lt', 'ld', 'w')
    n = n + 1
    local w = tonumber(f[2])
    if w and w > 0 then
      for _ = 1, w do redis.call('RPUSH', KEYS[i + 1], '0') end
      redis.call('PEXPIRE', KEYS[i + 1], wake_ms)
    end
  end
end
return n
