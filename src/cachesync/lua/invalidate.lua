-- cachesync invalidate: after committed writes, remove (or stale-mark) the
-- cached values of one or more keys, void every outstanding lease, and leave
-- a short-lived tombstone recording the invalidated version and time. One call
-- serves a whole batch: each key carries its own committed version.
--
-- KEYS: for each key i, KEYS[2i-1] = entry (layout: _entry.lua), KEYS[2i] = wake list
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
-- the TTLs be positive and each version "" or a finite number. A foreign key (wrong type, or a string that
-- is not an entry) is replaced.
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
local nowms = entry_ms(tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
local had = 0
local names = {}
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local ver = ARGV[5 + (i + 1) / 2]
  local e = entry_get(k) or {}  -- a foreign key where an entry belongs: replaced by the tombstone
  local v, vver, fl, w = e.v, e.ver, e.fl, tonumber(e.w)
  if v then had = had + 1 end
  local newfl = fl
  if vver and (not newfl or tonumber(vver) > tonumber(newfl)) then newfl = vver end
  if ver ~= '' and (not newfl or tonumber(ver) > tonumber(newfl)) then newfl = ver end
  if mode == 's' and v then
    e.lt, e.ld, e.w, e.s, e.ti, e.fl = nil, nil, nil, true, nowms, newfl
    if redis.call('PTTL', k) < tomb_ms then entry_put(k, e, tomb_ms) else entry_put(k, e, nil) end
  else
    entry_put(k, {ti = nowms, fl = newfl}, tomb_ms)
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
