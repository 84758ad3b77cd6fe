-- cachesync fill: write back a value loaded from the database after a miss.
-- Accepted only while the caller still holds the lease it got from get.lua
-- (an invalidation or a writer's set removes the lease), and only if the
-- value's version is not older than the entry's version floor.
--
-- KEYS: for each key i, KEYS[2i-1] = entry (layout: _entry.lua), KEYS[2i] = wake list
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
--
-- Validates every argument of every key before the first write (an error reply, nothing changed): TTLs are
-- numbers in (0, 1e13] ms, versions "" or numeric, negative flags "0"/"1". A foreign key (wrong type, or a
-- string that is not an entry) is deleted and holds no lease.
local function bad_ms(x) return not x or x ~= x or x <= 0 or x > 1e13 end  -- NaN fails x == x
local token = ARGV[1]
local wake_ms = tonumber(ARGV[2])
if bad_ms(wake_ms) or #ARGV ~= 2 + (#KEYS / 2) * 4 then
  return redis.error_reply('ERR cachesync fill.lua: bad arguments (wake ms or argument count)')
end
for i = 1, #KEYS, 2 do
  local j = 3 + (i - 1) * 2
  local ttl, ver, neg = tonumber(ARGV[j + 2]), ARGV[j + 1], ARGV[j + 3]
  if bad_ms(ttl) or (ver ~= '' and not (tonumber(ver) and tonumber(ver) == tonumber(ver) and math.abs(tonumber(ver)) < 1e300)) or (neg ~= '0' and neg ~= '1') then
    return redis.error_reply('ERR cachesync fill.lua: bad TTL, version or negative flag for ' .. KEYS[i])
  end
end
local out = {}
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local j = 3 + (i - 1) * 2
  local payload, ver, ttl, neg = ARGV[j], ARGV[j + 1], tonumber(ARGV[j + 2]), ARGV[j + 3]
  local e = entry_get(k)
  if not e then
    redis.call('DEL', k)
    e = {}
  end
  local lt, fl, w = e.lt, e.fl, tonumber(e.w)
  if token ~= '' and lt ~= token then
    out[#out + 1] = 0
  elseif ver ~= '' and fl and tonumber(ver) < tonumber(fl) then
    e.lt, e.ld, e.w = nil, nil, nil
    entry_put(k, e, nil)
    out[#out + 1] = -1
  else
    local newfl = fl
    if ver ~= '' and (not fl or tonumber(ver) > tonumber(fl)) then newfl = ver end
    local ne = {v = payload, fl = newfl, n = (neg == '1') or nil}
    if ver ~= '' then ne.ver = ver end
    entry_put(k, ne, ttl)
    out[#out + 1] = 1
  end
  if w and w > 0 and out[#out] ~= 0 then
    -- wake every registered waiter, and turn items still pending from earlier wake-ups into this one
    local item = '0'
    if out[#out] == 1 then item = 'F' .. neg .. ver .. '|' .. payload end
    local n = w + redis.call('LLEN', KEYS[i + 1])
    redis.call('DEL', KEYS[i + 1])
    for _ = 1, n do redis.call('RPUSH', KEYS[i + 1], item) end
    redis.call('PEXPIRE', KEYS[i + 1], wake_ms)
  end
end
return out
