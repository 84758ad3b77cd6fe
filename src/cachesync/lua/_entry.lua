-- cachesync entry layout: prepended to get, fill, set, invalidate, release and peek (core/scripts.py), so
-- that one definition reads and writes entries. Mirrored in Python by cachesync.core.layout (same tests).
--
-- An entry is one Redis string, so that a hit is one GET and a batch hit one MGET:
--   "V" .. ver .. "|" .. payload   a fresh value whose version floor equals its version ("" = none)
--   "N" .. ver .. "|" .. payload   the same for a negative (NOT_FOUND) entry
--   "M" .. ver .. "|" .. fl .. "|" .. flags .. "|" .. lt .. "|" .. ld .. "|" .. w .. "|" .. ti .. "|" .. payload
--                                  every other state; flags: "v" holds a value, "n" negative, "s" stale-marked
-- Fields: ver the value's version, fl version floor (highest version seen by a fill, set or invalidation),
-- lt lease token, ld lease deadline (server ms), w registered waiters, ti time of the last invalidation (server
-- ms: the tombstone). Numbers are decimal text; versions are finite numbers. Anything else at an entry's key
-- (a wrong Redis type, an unknown first byte, a missing separator, a non-numeric field) is foreign:
-- entry_get answers nil and the scripts replace it (deleting is always safe: a lease it removes cannot fill).
local function entry_num(x, version)
  if x == '' then return true end
  local n = tonumber(x)
  if not n or n ~= n then return false end
  if version then return math.abs(n) < 1e300 end
  return math.abs(n) < 1e16
end

local function entry_get(k)
  local raw = redis.pcall('GET', k)
  if type(raw) == 'table' then return nil end  -- WRONGTYPE: not one of our strings
  if not raw then return {} end
  local c = string.byte(raw, 1)
  if c == 86 or c == 78 then  -- "V" / "N"
    local i = string.find(raw, '|', 2, true)
    if not i then return nil end
    local ver = string.sub(raw, 2, i - 1)
    if not entry_num(ver, true) then return nil end
    if ver == '' then ver = nil end
    return {v = string.sub(raw, i + 1), ver = ver, fl = ver, n = (c == 78) or nil}
  end
  if c ~= 77 then return nil end  -- not "M"
  local ver, fl, flags, lt, ld, w, ti, pos = string.match(raw,
    '^M([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|()')
  if not pos or not (entry_num(ver, true) and entry_num(fl, true) and entry_num(ld) and entry_num(w)
                     and entry_num(ti)) then
    return nil
  end
  local e = {}
  if ver ~= '' then e.ver = ver end
  if fl ~= '' then e.fl = fl end
  if lt ~= '' then e.lt = lt end
  if ld ~= '' then e.ld = ld end
  if w ~= '' then e.w = w end
  if ti ~= '' then e.ti = ti end
  if flags ~= '' then
    if string.find(flags, '[^vns]') then return nil end
    if string.find(flags, 'v', 1, true) then e.v = string.sub(raw, pos) end
    if string.find(flags, 'n', 1, true) then e.n = true end
    if string.find(flags, 's', 1, true) then e.s = true end
  end
  return e
end

-- Store e at k: with px (ms) the key's TTL becomes px, without it the key keeps its TTL. An entry left with
-- nothing (no value, floor, lease, waiters or tombstone) is deleted.
local function entry_put(k, e, px)
  local raw
  if e.v and not e.s and not e.lt and not e.ld and not e.w and not e.ti and e.fl == e.ver then
    if e.n then raw = 'N' else raw = 'V' end
    raw = raw .. (e.ver or '') .. '|' .. e.v
  elseif not (e.v or e.fl or e.lt or e.w or e.ti) then
    redis.call('DEL', k)
    return
  else
    local flags = ''
    if e.v then flags = 'v' end
    if e.n then flags = flags .. 'n' end
    if e.s then flags = flags .. 's' end
    raw = 'M' .. (e.ver or '') .. '|' .. (e.fl or '') .. '|' .. flags .. '|' .. (e.lt or '') .. '|' .. (e.ld or '')
          .. '|' .. (e.w or '') .. '|' .. (e.ti or '') .. '|' .. (e.v or '')
  end
  if px then
    redis.call('SET', k, raw, 'PX', px)
  else
    redis.call('SET', k, raw, 'KEEPTTL')
  end
end

local function entry_ms(x) return string.format('%.0f', x) end
