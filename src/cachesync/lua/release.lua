-- cachesync release: give up a lease without filling (the loader failed),
-- so that waiters retry at once instead of waiting for the lease deadline.
--
-- KEYS: for each key i, KEYS[2i-1] = entry (layout: _entry.lua), KEYS[2i] = wake list
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
  local e = entry_get(k)
  if e and e.lt == ARGV[1] then
    local w = tonumber(e.w)
    e.lt, e.ld, e.w = nil, nil, nil
    entry_put(k, e, nil)
    n = n + 1
    if w and w > 0 then
      for _ = 1, w do redis.call('RPUSH', KEYS[i + 1], '0') end
      redis.call('PEXPIRE', KEYS[i + 1], wake_ms)
    end
  end
end
return n
