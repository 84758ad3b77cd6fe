-- cachesync set: a writer puts the new value after (or before) its commit.
-- Voids every outstanding lease (a reader that loaded before this write can
-- no longer fill) and, when a version is given, refuses to replace a newer
-- version with an older one.
--
-- KEYS[1] = entry (layout: _entry.lua), KEYS[2] = wake list
-- ARGV[1] = payload, ARGV[2] = version ("" = none: unconditional),
-- ARGV[3] = TTL in ms, ARGV[4] = negative flag ("1" | "0"), ARGV[5] = wake list TTL in ms,
-- ARGV[6] = pub/sub channel to announce the changed entry key on ("" = none), so L1 copies drop it
--
-- Reply: 1 stored, -1 refused (older than the version floor)
--
-- Validates before it mutates (error reply, nothing changed); a foreign key (wrong type, or a string that
-- is not an entry) is replaced.
local function bad_ms(x) return not x or x ~= x or x <= 0 or x > 1e13 end  -- NaN fails x == x
local k = KEYS[1]
local payload, ver, ttl, neg, wake_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
if bad_ms(ttl) or bad_ms(wake_ms)
    or (ver ~= '' and not (tonumber(ver) and tonumber(ver) == tonumber(ver) and math.abs(tonumber(ver)) < 1e300)) or (neg ~= '0' and neg ~= '1') then
  return redis.error_reply('ERR cachesync set.lua: bad TTL, version, negative flag or wake ms for ' .. k)
end
local e = entry_get(k)
if not e then
  redis.call('DEL', k)
  e = {}
end
local fl, w = e.fl, tonumber(e.w)
local res = 1
if ver ~= '' and fl and tonumber(ver) < tonumber(fl) then
  res = -1
  e.lt, e.ld, e.w = nil, nil, nil
  entry_put(k, e, nil)
else
  local newfl = fl
  if ver ~= '' and (not fl or tonumber(ver) > tonumber(fl)) then newfl = ver end
  local ne = {v = payload, fl = newfl, n = (neg == '1') or nil}
  if ver ~= '' then ne.ver = ver end
  entry_put(k, ne, ttl)
end
if w and w > 0 then
  -- wake every waiter with the stored value ("F" .. neg .. version .. "|" .. payload) or "0" (retry);
  -- items still pending from earlier wake-ups are replaced as well
  local item = '0'
  if res == 1 then item = 'F' .. neg .. ver .. '|' .. payload end
  local n = w + redis.call('LLEN', KEYS[2])
  redis.call('DEL', KEYS[2])
  for _ = 1, n do redis.call('RPUSH', KEYS[2], item) end
  redis.call('PEXPIRE', KEYS[2], wake_ms)
end
if res == 1 and ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], k) end
return res
