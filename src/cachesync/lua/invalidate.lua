-- cachesync invalidate: after a committed write, remove (or stale-mark) the
-- cached values of one or more keys, void every outstanding lease, and leave
-- a short-lived tombstone recording the invalidated version and time.
--
-- KEYS: for each key i, KEYS[2i-1] = entry hash, KEYS[2i] = wake list
-- ARGV[1] = tombstone TTL in ms
-- ARGV[2] = version the write committed ("" = unknown); raises the version floor
-- ARGV[3] = mode: "d" delete the value, "s" keep it but mark it stale
-- ARGV[4] = wake list TTL in ms
-- ARGV[5] = pub/sub channel to announce the invalidated entry keys on ("" = none)
-- ARGV[6] = optional W3C traceparent of the writer's span: sent as a last line "tp=..." of the message (L1s of
--           older versions ignore lines that are not entry keys of their namespace)
--
-- Reply: the number of keys that held a value (fresh or stale).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tomb_ms, ver, mode, wake_ms, chan = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local had = 0
local names = {}
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local f = redis.pcall('HMGET', k, 'v', 'ver', 'fl', 'w')
  if f.err then f = {} end  -- a foreign key (wrong type) where an entry belongs: replaced by the tombstone
  local v, vver, fl, w = f[1], f[2], f[3], tonumber(f[4])
  if vver and not tonumber(vver) then vver = nil end
  if fl and not tonumber(fl) then fl = nil end
  if v then had = had + 1 end
  local newfl = fl
  for _, c in ipairs({vver, ver}) do
    if c and c ~= '' and (not newfl or tonumber(c) > tonumber(newfl)) then newfl = c end
  end
  if mode == 's' and v then
    redis.call('HDEL', k, 'lt', 'ld', 'w')
    redis.call('HSET', k, 's', '1', 'ti', now)
    if newfl then redis.call('HSET', k, 'fl', newfl) end
    if redis.call('PTTL', k) < tomb_ms then redis.call('PEXPIRE', k, tomb_ms) end
  else
    redis.call('DEL', k)
    redis.call('HSET', k, 'ti', now)
    if newfl then redis.call('HSET', k, 'fl', newfl) end
    redis.call('PEXPIRE', k, tomb_ms)
  end
  -- wake waiters with "0" (retry); a value item still pending from an earlier fill is now stale: replace it
  local n = redis.call('LLEN', KEYS[i + 1])
  if w then n = n + w end
  if n > 0 then
    redis.call('DEL', KEYS[i + 1])
    for _ = 1, n do redis.call('RPUSH', KEYS[i + 1], '0') end
    redis.call('PEXPIRE', KEYS[i + 1], wake_ms)
  end
  names[#names + 1] = k
end
if chan ~= '' then
  if ARGV[6] and ARGV[6] ~= '' then names[#names + 1] = 'tp=' .. ARGV[6] end
  redis.call('PUBLISH', chan, table.concat(names, '\n'))
end
return had
