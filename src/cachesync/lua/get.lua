-- cachesync get: cache-aside read with leases, for one or more keys.
--
-- KEYS: for each key i, KEYS[2i-1] = entry hash, KEYS[2i] = wake list
-- ARGV[1] = lease token (random, chosen by the client)
-- ARGV[2] = lease duration in ms (deadline taken from the server clock)
-- ARGV[3] = mode: "L" take a lease on a miss, "P" plain (no lease; miss is code 0)
-- ARGV[4] = wake list TTL in ms
--
-- Entry hash fields: v = payload, ver = version of v, n = "1" if v is a
-- negative (NOT_FOUND) entry, s = "1" if v is stale-marked, fl = version floor
-- (highest version seen by a fill, set or invalidation), lt = lease token,
-- ld = lease deadline (server ms), w = number of registered waiters,
-- ti = time of the last invalidation (server ms; tombstone marker).
--
-- Reply: a flat array, 4 items per key:
--   1, payload, version|false, flags   hit (flags: "" | "n" negative | "s" stale)
--   2, token, stale payload|false, version|false   the caller now holds the lease
--   3, wait ms, stale payload|false, version|false  another holder; wait for it
--   0, false, false, false            miss in plain mode (no lease taken)
--
-- Validates before it mutates: a bad ARGV is an error reply before any write. A foreign key (wrong Redis
-- type) where an entry belongs is deleted and read as a miss; non-numeric lease/waiter fields are ignored
-- (an unreadable lease deadline counts as expired).
local function bad_ms(x) return not x or x ~= x or x <= 0 or x > 1e13 end  -- NaN fails x == x
local lease_ms = tonumber(ARGV[2])
local wake_ms = tonumber(ARGV[4])
if bad_ms(lease_ms) or bad_ms(wake_ms)
    or (ARGV[3] ~= 'L' and ARGV[3] ~= 'P') or ARGV[1] == '' then
  return redis.error_reply('ERR cachesync get.lua: bad arguments (token, lease ms, mode, wake ms)')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local token = ARGV[1]
local mode = ARGV[3]
local out = {}
for i = 1, #KEYS, 2 do
  local k = KEYS[i]
  local f = redis.pcall('HMGET', k, 'v', 'ver', 'n', 's', 'lt', 'ld', 'w')
  if f.err then  -- WRONGTYPE: not one of our hashes
    redis.call('DEL', k)
    f = {}
  end
  local v, ver, neg, stale, lt, ld = f[1], f[2], f[3], f[4], f[5], tonumber(f[6])
  if f[7] and not tonumber(f[7]) then redis.call('HDEL', k, 'w') end
  if v and stale ~= '1' then
    local flags = ''
    if neg == '1' then flags = 'n' end
    out[#out + 1] = 1; out[#out + 1] = v; out[#out + 1] = ver or false; out[#out + 1] = flags
  elseif mode == 'P' then
    if v then
      out[#out + 1] = 1; out[#out + 1] = v; out[#out + 1] = ver or false; out[#out + 1] = 's'
    else
      out[#out + 1] = 0; out[#out + 1] = false; out[#out + 1] = false; out[#out + 1] = false
    end
  elseif lt and ld and ld > now then
    redis.call('HINCRBY', k, 'w', 1)
    redis.call('PEXPIRE', KEYS[i + 1], wake_ms)
    out[#out + 1] = 3; out[#out + 1] = ld - now; out[#out + 1] = v or false; out[#out + 1] = ver or false
  else
    redis.call('HSET', k, 'lt', token, 'ld', now + lease_ms)
    local pttl = redis.call('PTTL', k)
    if pttl < lease_ms then redis.call('PEXPIRE', k, lease_ms) end
    out[#out + 1] = 2; out[#out + 1] = token; out[#out + 1] = v or false; out[#out + 1] = ver or false
  end
end
return out
