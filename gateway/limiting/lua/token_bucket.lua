-- Token buckets, updated atomically: the rate limiter's only Redis logic.
--
-- Each bucket is kept as GCRA (the generic cell rate algorithm): a token bucket stored as one
-- number, the theoretical arrival time `tat`, the instant (microseconds, Redis clock) at which
-- the bucket will be full again. Tokens now = burst - (tat - now) / interval. One integer per
-- key, and a full bucket needs no key at all: it is deleted, so idle users cost nothing. The
-- clock is Redis `TIME`, so every gateway on every host agrees.
--
-- KEYS[1..n]  the buckets one request takes from (its policy's, the per-address ceiling's).
--             All or nothing: unless every bucket has the tokens, none is debited. On Redis
--             Cluster the gateway calls with one key at a time (keys of one call must share a
--             slot) and gives tokens back itself.
-- ARGV, four per key, in order:
--   interval  microseconds per token (1e6 / rate per second)
--   burst     the bucket's capacity in tokens
--   cost      tokens to take; negative gives tokens back (a refund, capped at a full bucket);
--             0 only reads
--   force     1: take the tokens even if that leaves the bucket in debt (settling a token
--             budget after the fact: the debt is waited out by the next requests); 0: only if
--             they are there
--
-- Returns integers, five per key: allowed (1|0: this bucket had the tokens), remaining tokens
-- after the request (floor; as before it when the request was denied), microseconds until
-- `cost` tokens are there (0 when allowed), microseconds until at least one token is there,
-- microseconds until the bucket is full; then Redis TIME (seconds, microseconds).

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])

local tats = {}
local denied = false
for i = 1, #KEYS do
  local interval = tonumber(ARGV[4 * i - 3])
  local capacity = tonumber(ARGV[4 * i - 2]) * interval
  local cost = tonumber(ARGV[4 * i - 1])
  local force = ARGV[4 * i] == '1'
  local tat = tonumber(redis.call('GET', KEYS[i]) or now)
  if tat < now then
    tat = now
  end
  local new_tat = tat + cost * interval
  if cost > 0 and not force and new_tat - now > capacity then
    denied = true
  end
  tats[i] = {tat, new_tat, interval, capacity, cost, force}
end

local out = {}
for i = 1, #KEYS do
  local tat, new_tat, interval, capacity, cost, force = unpack(tats[i])
  local allowed = 1
  local wait = 0
  if cost > 0 and not force and new_tat - now > capacity then
    allowed = 0
    wait = new_tat - now - capacity
  end
  if denied then
    new_tat = tat
  elseif new_tat < now then
    new_tat = now
  end
  if not denied and cost ~= 0 then
    local ttl = math.ceil((new_tat - now) / 1000)
    if ttl > 0 then
      -- %.0f: tostring() would print 1.8e+15 and lose the microseconds.
      redis.call('SET', KEYS[i], string.format('%.0f', new_tat), 'PX', ttl)
    else
      redis.call('DEL', KEYS[i])
    end
  end
  local used = new_tat - now
  -- A hair of tolerance so that 5 tokens computed as 4.9999999 still count as 5.
  local remaining = math.floor((capacity - used) / interval + 1e-9)
  local next_token = 0
  if remaining < 1 then
    next_token = used - capacity + interval
  end
  local base = 5 * (i - 1)
  out[base + 1] = allowed
  out[base + 2] = remaining
  out[base + 3] = math.ceil(wait)
  out[base + 4] = math.ceil(next_token)
  out[base + 5] = math.ceil(used)
end
out[#out + 1] = tonumber(clock[1])
out[#out + 1] = tonumber(clock[2])
return out
