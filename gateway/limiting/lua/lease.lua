-- Leases on a per-user cap of requests in flight (a policy's `concurrent`): one sorted set per
-- (policy, identity), members are lease ids, scores their expiry (milliseconds, Redis clock).
-- A live request renews its lease; a gateway that dies stops renewing, and its leases drop out
-- by themselves once expired. One key per call: valid on Redis Cluster.
--
-- KEYS[1]  the set
-- ARGV[1]  operation: acquire | renew | release
-- ARGV[2]  lease id
-- ARGV[3]  cap (acquire)
-- ARGV[4]  lease lifetime in milliseconds (acquire, renew)
--
-- Returns {granted (1|0), leases held now}.

local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local op = ARGV[1]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)

if op == 'release' then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return {1, redis.call('ZCARD', KEYS[1])}
end

local ttl = tonumber(ARGV[4])
if op == 'renew' then
  local renewed = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {renewed, redis.call('ZCARD', KEYS[1])}
end

local held = redis.call('ZCARD', KEYS[1])
if held >= tonumber(ARGV[3]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ttl)
return {1, held + 1}
