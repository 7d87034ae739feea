-- One token bucket, updated atomically: the rate limiter's only Redis logic.
--
-- Kept as GCRA (the generic cell rate algorithm), which is a token bucket stored as one number:
-- the theoretical arrival time `tat`, the instant (microseconds, Redis clock) at which the
-- bucket will be full again. Tokens now = burst - (tat - now) / interval. One integer per key,
-- no read-modify-write of two fields, and a full bucket needs no key at all: it is deleted, so
-- idle users cost nothing. The clock is Redis `TIME`, so every gateway on every host agrees.
--
-- KEYS[1]  the bucket (one key per call, so the script is valid on Redis Cluster)
-- ARGV[1]  interval: microseconds per token (1e6 / rate per second)
-- ARGV[2]  burst: the bucket's capacity in tokens
-- ARGV[3]  cost: tokens this request takes; negative gives tokens back (a refund, capped at
--          a full bucket); 0 only reads
--
-- Returns integers: allowed (1|0), remaining tokens (floor, may be negative for a debt),
-- microseconds until `cost` tokens are there (0 when allowed), microseconds until at least one
-- token is there, microseconds until the bucket is full, and Redis TIME (seconds, microseconds).

local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local capacity = burst * interval

local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then
  tat = now
end

local allowed = 1
local wait = 0
local new_tat = tat + cost * interval
if cost > 0 and new_tat - now > capacity then
  allowed = 0
  wait = new_tat - now - capacity
  new_tat = tat
elseif new_tat < now then
  new_tat = now
end

if allowed == 1 and cost ~= 0 then
  local ttl = math.ceil((new_tat - now) / 1000)
  if ttl > 0 then
    -- %.0f: tostring() would print 1.8e+15 and lose the microseconds.
    redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl)
  else
    redis.call('DEL', KEYS[1])
  end
end

local used = new_tat - now
-- A hair of tolerance so that 5 tokens computed as 4.9999999 still count as 5.
local remaining = math.floor((capacity - used) / interval + 1e-9)
local next_token = 0
if remaining < 1 then
  next_token = used - capacity + interval
end
return {allowed, remaining, math.ceil(wait), math.ceil(next_token), math.ceil(used),
        tonumber(clock[1]), tonumber(clock[2])}
