-- cachesync peek: the fields of an entry (layout: _entry.lua), without side effects.
--
-- KEYS[1] = entry
-- Reply: a flat array field, value, field, value ... (empty when absent); fields v, ver, n, s, fl, lt, ld, w, ti
-- as present (flags n and s as "1"). A key that is not an entry is an error reply.
local e = entry_get(KEYS[1])
if not e then
  return redis.error_reply('WRONGTYPE cachesync peek.lua: ' .. KEYS[1] .. ' holds no cachesync entry')
end
local out = {}
for _, name in ipairs({'v', 'ver', 'n', 's', 'fl', 'lt', 'ld', 'w', 'ti'}) do
  local x = e[name]
  if x then
    if x == true then x = '1' end
    out[#out + 1] = name
    out[#out + 1] = x
  end
end
return out
