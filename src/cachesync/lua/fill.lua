-- cachesync fill: write back a value loaded from the database after a miss.
-- Accepted only while the caller still holds the lease it got from get.lua
-- (an invalidation or a writer's set removes the lease), and only if the
-- value's version is not older than the entry's version floor.
--
-- KEYS: for each key i, KEYS[2i-1] = entry hash, KEYS[2i] = wake list
-- ARGV[1] = lease token ("" = plain mode: no lease check)
-- ARGV[2] = wake list TTL in ms
-- ARGV[3 + 4(i-1)] .. ARGV[6 + 4(i-1)] for key i:
--   payload, version ("" = none), TTL in ms, negative flag ("1" | "0")
--
-- Waiters blocked on the wake list get one item each: "F" .. negative flag .. version .. "|" .. payload
-- (the value just stored: no second round trip) or "0" (retry).
--
-- Reply: an array with one code per key:
--   1 accepted, 0 refused (lease lost), -1 refused (older than the version floor)
local token = ARGV[1]
local wake_ms = tonumber(ARGV[2])
local out = {}
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local j = 3 + (i - 1) * 2
  local payload, ver, ttl, neg = ARGV[j], ARGV[j + 1], tonumber(ARGV[j + 2]), ARGV[j + 3]
  local f = redis.call('HMGET', k, 'lt', 'fl', 'w')
  local lt, fl, w = f[1], f[2], f[3]
  if token ~= '' and lt ~= token then
    out[#out + 1] = 0
  elseif ver ~= '' and fl and tonumber(ver) < tonumber(fl) then
    redis.call('HDEL', k, 'lt', 'ld', 'w')
    out[#out + 1] = -1
  else
    redis.call('DEL', k)
    local newfl = fl
    if ver ~= '' and (not fl or tonumber(ver) > tonumber(fl)) then newfl = ver end
    if ver ~= '' then
      redis.call('HSET', k, 'v', payload, 'n', neg, 'ver', ver)
    else
      redis.call('HSET', k, 'v', payload, 'n', neg)
    end
    if newfl then redis.call('HSET', k, 'fl', newfl) end
    redis.call('PEXPIRE', k, ttl)
    out[#out + 1] = 1
  end
  if w and tonumber(w) > 0 and out[#out] ~= 0 then
    -- wake every registered waiter, and turn items still pending from earlier wake-ups into this one
    local item = '0'
    if out[#out] == 1 then item = 'F' .. neg .. ver .. '|' .. payload end
    local n = tonumber(w) + redis.call('LLEN', KEYS[i + 1])
    redis.call('DEL', KEYS[i + 1])
    for _ = 1, n do redis.call('RPUSH', KEYS[i + 1], item) end
    redis.call('PEXPIRE', KEYS[i + 1], wake_ms)
  end
end
return out
