-- cachesync set: a writer puts the new value after (or before) its commit.
-- Voids every outstanding lease (a reader that loaded before this write can
-- no longer fill) and, when a version is given, refuses to replace a newer
-- version with an older one.
--
-- KEYS[1] = entry hash, KEYS[2] = wake list
-- ARGV[1] = payload, ARGV[2] = version ("" = none: unconditional),
-- ARGV[3] = TTL in ms, ARGV[4] = negative flag ("1" | "0"), ARGV[5] = wake list TTL in ms,
-- ARGV[6] = pub/sub channel to announce the changed entry key on ("" = none), so L1 copies drop it
--
-- Reply: 1 stored, -1 refused (older than the version floor)
--
-- Validates before it mutates (error reply, nothing changed); a foreign key (wrong type) is replaced.
local function bad_ms(x) return not x or x ~= x or x <= 0 or x > 1e13 end  -- NaN fails x == x
local k = KEYS[1]
local payload, ver, ttl, neg, wake_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
if bad_ms(ttl) or bad_ms(wake_ms)
    or (ver ~= '' and not (tonumber(ver) and tonumber(ver) == tonumber(ver) and math.abs(tonumber(ver)) < 1e300)) or (neg ~= '0' and neg ~= '1') then
  return redis.error_reply('ERR cachesync set.lua: bad TTL, version, negative flag or wake ms for ' .. k)
end
local f = redis.pcall('HMGET', k, 'fl', 'w')
if f.err then
  redis.call('DEL', k)
  f = {}
end
local fl, w = f[1], tonumber(f[2])
if fl and not tonumber(fl) then fl = nil end
local res = 1
if ver ~= '' and fl and tonumber(ver) < tonumber(fl) then
  res = -1
  redis.call('HDEL', k, 'lt', 'ld', 'w')
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
