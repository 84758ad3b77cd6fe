-- cachesync invalidate: after committed writes, remove (or stale-mark) the
-- cached values of one or more keys, void every outstanding lease, and leave
-- a short-lived tombstone recording the invalidated version and time. One call
-- serves a whole batch: each key carries its own committed version.
--
-- KEYS: for each key i, KEYS[2i-1] = entry hash, KEYS[2i] = wake list
-- ARGV[1] = tombstone TTL in ms
-- ARGV[2] = mode: "d" delete the value, "s" keep it but mark it stale
-- ARGV[3] = wake list TTL in ms
-- ARGV[4] = pub/sub channel to announce the invalidated entry keys on ("" = none)
-- ARGV[5] = W3C traceparent of the writer's span ("" = none): sent as a last line "tp=..." of the message (L1s
--           of older versions ignore lines that are not entry keys of their namespace)
-- ARGV[5+i] = version key i's write committed ("" = unknown); raises its version floor
--
-- Reply: the number of keys that held a value (fresh or stale).
--
-- Validates before it mutates (error reply, nothing changed): the counts of KEYS and versions must match,
-- the TTLs be positive and each version "" or a finite number. A foreign key (wrong type) is replaced.
local function bad_ms(x) return not x or x ~= x or x <= 0 or x > 1e13 end  -- NaN fails x == x
local tomb_ms, mode, wake_ms, chan, tp = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5]
local n = #KEYS / 2
if #KEYS % 2 ~= 0 or #ARGV ~= 5 + n or bad_ms(tomb_ms) or bad_ms(wake_ms) or (mode ~= 'd' and mode ~= 's') then
  return redis.error_reply('ERR cachesync invalidate.lua: bad arguments (need 2 KEYS and 1 version per key, '
    .. 'tombstone ms, mode d|s, wake ms, channel, traceparent); got ' .. #KEYS .. ' KEYS and ' .. #ARGV .. ' ARGV')
end
for i = 1, n do
  local c = ARGV[5 + i]
  if c ~= '' and not (tonumber(c) and tonumber(c) == tonumber(c) and math.abs(tonumber(c)) < 1e300) then
    return redis.error_reply('ERR cachesync invalidate.lua: bad version ' .. c .. ' for ' .. KEYS[2 * i - 1])
  end
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local had = 0
local names = {}
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local ver = ARGV[5 + (i + 1) / 2]
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
  local nw = redis.call('LLEN', KEYS[i + 1])
  if w then nw = nw + w end
  if nw > 0 then
    redis.call('DEL', KEYS[i + 1])
    for _ = 1, nw do redis.call('RPUSH', KEYS[i + 1], '0') end
    redis.call('PEXPIRE', KEYS[i + 1], wake_ms)
  end
  names[#names + 1] = k
end
if chan ~= '' then
  if tp ~= '' then names[#names + 1] = 'tp=' .. tp end
  redis.call('PUBLISH', chan, table.concat(names, '\n'))
end
return had
