-- cachesync get: cache-aside read with leases, for one or more keys.
--
-- KEYS: for each key i, KEYS[2i-1] = entry (layout: _entry.lua), KEYS[2i] = wake list
-- ARGV[1] = lease token (random, chosen by the client)
-- ARGV[2] = lease duration in ms (deadline taken from the server clock)
-- ARGV[3] = mode: "L" take a lease on a miss, "P" plain (no lease; miss is code 0)
-- ARGV[4] = wake list TTL in ms
--
-- Reply: a flat array, 4 items per key:
--   1, payload, version|false, flags   hit (flags: "" | "n" negative | "s" stale)
--   2, token, stale payload|false, version|false   the caller now holds the lease (also when it already held
--                                                   it: a call sent again after a lost reply is granted again)
--   3, wait ms, stale payload|false, version|false  another holder; wait for it
--   0, false, false, false            miss in plain mode (no lease taken)
--
-- Validates before it mutates: a bad ARGV is an error reply before any write. A foreign key (wrong Redis
-- type, or a string that is not an entry) where an entry belongs is deleted and read as a miss.
local function bad_ms(x) return not x or x ~= x or x <= 0 or x > 1e13 end  -- NaN fails x == x
local lease_ms = tonumber(ARGV[2])
local wake_ms = tonumber(ARGV[4])
if bad_ms(lease_ms) or bad_ms(wake_ms)
    or (ARGV[3] ~= 'L' and ARGV[3] ~= 'P') or ARGV[1] == '' or string.find(ARGV[1], '|', 1, true) then
  return redis.error_reply('ERR cachesync get.lua: bad arguments (token without "|", lease ms, mode, wake ms)')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token = ARGV[1]
local mode = ARGV[3]
local out = {}
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local e = entry_get(k)
  if not e then
    redis.call('DEL', k)
    e = {}
  end
  local v, ver = e.v, e.ver
  local ld = tonumber(e.ld)
  if v and not e.s then
    local flags = ''
    if e.n then flags = 'n' end
    out[#out + 1] = 1; out[#out + 1] = v; out[#out + 1] = ver or false; out[#out + 1] = flags
  elseif mode == 'P' then
    if v then
      out[#out + 1] = 1; out[#out + 1] = v; out[#out + 1] = ver or false; out[#out + 1] = 's'
    else
      out[#out + 1] = 0; out[#out + 1] = false; out[#out + 1] = false; out[#out + 1] = false
    end
  elseif e.lt and ld and ld > now and e.lt ~= token then  -- our own token: the same read sent again
    e.w = entry_ms((tonumber(e.w) or 0) + 1)
    entry_put(k, e, nil)
    redis.call('PEXPIRE', KEYS[i + 1], wake_ms)
    out[#out + 1] = 3; out[#out + 1] = ld - now; out[#out + 1] = v or false; out[#out + 1] = ver or false
  else
    e.lt = token
    e.ld = entry_ms(now + lease_ms)
    if redis.call('PTTL', k) < lease_ms then entry_put(k, e, lease_ms) else entry_put(k, e, nil) end
    out[#out + 1] = 2; out[#out + 1] = token; out[#out + 1] = v or false; out[#out + 1] = ver or false
  end
end
return out
