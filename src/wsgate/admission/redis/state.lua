--[[
wsgate shared admission state: the one script every replica runs.

THEORY OF OPERATION
===================

Everything that changes the shared admission state lives in this script; a
replica never writes these keys with plain commands. Redis runs one script at a
time, so each operation below is atomic: no replica ever sees (or acts on) a
half-done decision.

Keys (all share the hash tag {wsgate:NS}, so in a Redis Cluster they live in
one slot and one script may touch them all; KEYS[1] is always P:replicas and P
is derived from it):

  P:replicas      ZSET  replica -> lease expiry, server ms     (register/renew/reap)
  P:lease         HASH  replica -> session token              (register/reap)
  P:renewed       HASH  replica -> last renewal, server ms    (renew/reap)
  P:held:R        HASH  backend -> live slots held by R       (admit/release/register/reap)
  P:total         HASH  backend -> live slots, all replicas   (admit/release/register/reap)
  P:caps          HASH  backend -> cap the replicas enforce   (renew; display only)
  P:limits        HASH  connect-rate settings                 (renew; display only)
  P:rate          STR   GCRA TAT of the global connect rate, server us (admit)
  P:rate:ip:IP    STR   GCRA TAT of one client IP, expires when full (admit)
  P:clients       HASH  client IP -> live connections, all replicas (admit/release/register/reap)
  P:clients:R     HASH  client IP -> live connections held by R     (admit/release/register/reap)
  P:close         STR   GCRA TAT of the shared rebalance-close budget (close_tokens)
  P:clock         STR   server ms of the last renewal by anyone (renew)

The invariant this script keeps, after every operation:

  total[b] == sum over registered replicas R of held:R[b]     (for every b)
  clients[c] == sum over registered replicas R of clients:R[c] (for every client c)

A client's field is deleted when its count reaches 0, so P:clients holds only
the clients that have a connection: it never grows with clients gone. Only
connections admitted under max_connections_per_client are counted there.

and an admission increments total[b] only while total[b] < cap(b). So as long
as every live connection is counted in the held hash of a registered replica,
no backend gets more connections than its cap. "Registered" means: present in
P:replicas and P:lease.

Who may change what:
  admit    increments total[b] and held:R[b] together, and spends the rate
           tokens, only for the caller's own R and only with R's current
           session token and an unexpired lease.
  release  decrements both together, only with R's current token, never below 0.
  register (renew with resync=1) sets held:R to the replica's own local truth
           (the connections it really has open), moves total by the
           difference, and issues a new session token; operations still in
           flight with the old token are refused when they arrive, so a
           command that timed out on the client can never change the state
           after the replica has re-registered.
  renew    extends R's lease and reaps every replica whose lease has
           expired: their held counts are subtracted from total and all their
           keys deleted, in the same step.

What happens on a crash:
  - A replica dies: it stops renewing; the first renewal by anyone after its
    lease expires gives its slots back (lease_ttl plus at most one renewal
    period). Its connections died with it, so the counts match the truth.
  - A replica loses Redis: its calls fail or time out, it stops admitting
    through Redis (on_failure decides what it does meanwhile) and keeps its
    connections. When Redis answers again it re-registers its local truth.
    If its lease was reaped in between and others admitted into its slots,
    the re-registration reports the excess per backend so the replica closes
    that many of its newest connections; totals are over the cap only until
    those closes are released.
  - Redis stops (SIGSTOP) and resumes: nobody could renew while Redis was
    frozen, so leases are shifted forward by the gap seen in P:clock instead
    of reaping replicas that simply could not reach it. Calls that were
    waiting in Redis's input meanwhile run late; an admission or a
    re-registration carries a deadline (ARGV[2], server time) after which its
    replica has stopped waiting for it, and is void when it runs after it.
  - Redis loses its data: every token is gone, so every replica's next call
    is refused and it re-registers its local truth; totals become the sum of
    the truths again within one renewal period.
  - Redis loses only its last writes (failover to a lagging replica): each
    script's writes replicate as one unit, so the invariant still holds, but
    held:R may miss admissions R saw acknowledged. renew returns held:R so
    that R can compare it with its truth and re-register when they differ.
]]

if redis.replicate_commands then
  redis.replicate_commands()
end

local REPLICAS = KEYS[1]
local P = string.sub(REPLICAS, 1, -10) -- strip ":replicas"
local LEASE = P .. ':lease'
local RENEWED = P .. ':renewed'
local TOTAL = P .. ':total'
local CAPS = P .. ':caps'
local LIMITS = P .. ':limits'
local RATE = P .. ':rate'
local CLOSE = P .. ':close'
local CLOCK = P .. ':clock'
local CLIENTS = P .. ':clients'

local function held_key(replica)
  return P .. ':held:' .. replica
end

local function clients_key(replica)
  return CLIENTS .. ':' .. replica
end

local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

local function num(text)
  return string.format('%.17g', text)
end

-- GCRA on microseconds: the state is the instant the bucket is full again.
-- Returns allowed, the TAT to store when spent, and the wait when refused.
local function gcra(tat, now, per_second, burst)
  local interval = 1000000 / per_second
  local base = now
  if tat and tat > now then
    base = tat
  end
  local new_tat = base + interval
  local allow_at = new_tat - burst * interval
  if allow_at > now + 0.001 then
    return false, tat, allow_at - now
  end
  return true, new_tat, 0
end

-- A TAT is only worth keeping until the bucket is full again.
local function store_tat(key, tat, now)
  local ttl_ms = math.ceil((tat - now) / 1000) + 1
  redis.call('SET', key, num(tat), 'PX', ttl_ms)
end

local function rate_offset(now)
  local tat = tonumber(redis.call('GET', RATE))
  if not tat or tat <= now then
    return '0'
  end
  return num(tat - now)
end

local function add_to(hash, field, delta)
  if delta == 0 then
    return tonumber(redis.call('HGET', hash, field)) or 0
  end
  local value = redis.call('HINCRBY', hash, field, delta)
  if value <= 0 then
    redis.call('HDEL', hash, field)
  end
  return value
end

local function session_ok(replica, token)
  return redis.call('HGET', LEASE, replica) == token
end

-- Subtract what a replica holds in one of its hashes from the matching total.
local function give_back(key, totals)
  local held = redis.call('HGETALL', key)
  for i = 1, #held, 2 do
    add_to(totals, held[i], -tonumber(held[i + 1]))
  end
  redis.call('DEL', key)
end

-- Forget a replica and give back every slot it held (and its clients' counts), in one step.
local function drop_replica(replica)
  give_back(held_key(replica), TOTAL)
  give_back(clients_key(replica), CLIENTS)
  redis.call('HDEL', LEASE, replica)
  redis.call('HDEL', RENEWED, replica)
  redis.call('ZREM', REPLICAS, replica)
end

-- ARGV: op, deadline, replica, token, least_loaded, preferred, rate_ps, rate_burst,
--       client_key, client_ps, client_burst, client_cap, then backend, cap pairs.
-- Reply: status, backend, retry_after_us, rate_offset_us, live_replicas,
--        then the total of every candidate after the decision.
local function admit()
  local replica, token = ARGV[3], ARGV[4]
  local now = now_us()
  if not session_ok(replica, token) then
    return { 'stale' }
  end
  local expiry = tonumber(redis.call('ZSCORE', REPLICAS, replica))
  if not expiry or expiry * 1000 < now then
    return { 'stale' }
  end

  local least_loaded = ARGV[5] == '1'
  local preferred = ARGV[6]
  local ids, caps = {}, {}
  local n = (#ARGV - 12) / 2
  for i = 1, n do
    ids[i] = ARGV[11 + 2 * i]
    caps[i] = tonumber(ARGV[12 + 2 * i])
  end
  local counts = redis.call('HMGET', TOTAL, unpack(ids))
  for i = 1, n do
    counts[i] = tonumber(counts[i]) or 0
  end

  -- The same rule as contract.choose_backend; keep them in step.
  local best, best_load = nil, 2.0
  for i = 1, n do
    local used = counts[i]
    if used < caps[i] then
      if ids[i] == preferred then
        best = i
        break
      end
      if not least_loaded then
        if preferred == '' then
          best = i
          break
        end
        if not best then
          best = i
        end
      else
        local load = used / caps[i]
        if load < best_load then
          best, best_load = i, load
        end
      end
    end
  end

  local live = redis.call('ZCARD', REPLICAS)
  local function reply(status, backend, wait)
    local out = { status, backend, num(wait), rate_offset(now), live }
    for i = 1, n do
      out[5 + i] = counts[i]
    end
    return out
  end

  if not best then
    return reply('no_capacity', '', 0)
  end

  -- max_connections_per_client (ARGV[12], 0 for none): a capacity too, checked
  -- before any token is spent; counted in P:clients and P:clients:R on admission.
  local client_cap = tonumber(ARGV[12])
  local counted_client = nil
  if ARGV[9] ~= '' and client_cap > 0 then
    counted_client = ARGV[9]
    if (tonumber(redis.call('HGET', CLIENTS, counted_client)) or 0) >= client_cap then
      return reply('client_connection_limit', '', 0)
    end
  end

  -- Capacity first, then the rates; tokens are spent only when admitted.
  local rate_ps = tonumber(ARGV[7])
  local rate_tat
  if rate_ps > 0 then
    local ok, tat, wait = gcra(tonumber(redis.call('GET', RATE)), now, rate_ps, tonumber(ARGV[8]))
    if not ok then
      return reply('rate_limited', '', wait)
    end
    rate_tat = tat
  end
  local client_key, client_tat
  local client_ps = tonumber(ARGV[10])
  if ARGV[9] ~= '' and client_ps > 0 then
    client_key = P .. ':rate:ip:' .. ARGV[9]
    local ok, tat, wait = gcra(tonumber(redis.call('GET', client_key)), now, client_ps, tonumber(ARGV[11]))
    if not ok then
      return reply('client_rate_limited', '', wait)
    end
    client_tat = tat
  end

  if rate_tat then
    store_tat(RATE, rate_tat, now)
  end
  if client_tat then
    store_tat(client_key, client_tat, now)
  end
  redis.call('HINCRBY', TOTAL, ids[best], 1)
  redis.call('HINCRBY', held_key(replica), ids[best], 1)
  if counted_client then
    redis.call('HINCRBY', CLIENTS, counted_client, 1)
    redis.call('HINCRBY', clients_key(replica), counted_client, 1)
  end
  counts[best] = counts[best] + 1
  return reply('ok', ids[best], 0)
end

-- ARGV: op, deadline, replica, token, backend, client ('' when the slot counts for none).
-- Reply: status, total of that backend.
local function release()
  local replica, token, backend = ARGV[3], ARGV[4], ARGV[5]
  if not session_ok(replica, token) then
    return { 'stale', 0 }
  end
  local client = ARGV[6] or ''
  if client ~= '' and (tonumber(redis.call('HGET', clients_key(replica), client)) or 0) > 0 then
    add_to(clients_key(replica), client, -1)
    add_to(CLIENTS, client, -1) -- deleted at 0: a client gone leaves no key behind
  end
  local key = held_key(replica)
  if (tonumber(redis.call('HGET', key, backend)) or 0) <= 0 then
    return { 'ok', tonumber(redis.call('HGET', TOTAL, backend)) or 0 }
  end
  add_to(key, backend, -1)
  return { 'ok', math.max(add_to(TOTAL, backend, -1), 0) }
end

-- ARGV: op, deadline, replica, token, ttl_ms, resync, new_token,
--       n_held, (backend, count) * n_held, n_caps, (backend, cap) * n_caps,
--       rate_ps, rate_burst, client_ps, client_burst,
--       n_clients, (client, count) * n_clients (resync only: the clients' truth).
-- Reply: status, live_replicas, rate_offset_us, {total flat}, {excess flat}, {reaped},
--        {this replica's held, flat}, server time (us).
local function renew()
  local replica, token = ARGV[3], ARGV[4]
  local ttl_ms = tonumber(ARGV[5])
  local resync = ARGV[6] == '1'
  local now = now_us()
  local now_ms = math.floor(now / 1000)

  -- A gap in everyone's renewals longer than half a lease means Redis itself
  -- was not answering (stopped, or every replica cut off): the leases did not
  -- fail, so move them forward by the gap instead of reaping them.
  local clock = tonumber(redis.call('GET', CLOCK))
  if clock and now_ms - clock > ttl_ms / 2 then
    local gap = now_ms - clock
    local leases = redis.call('ZRANGE', REPLICAS, 0, -1, 'WITHSCORES')
    for i = 1, #leases, 2 do
      redis.call('ZADD', REPLICAS, tonumber(leases[i + 1]) + gap, leases[i])
    end
  end
  redis.call('SET', CLOCK, now_ms)

  local reaped = redis.call('ZRANGEBYSCORE', REPLICAS, '-inf', '(' .. now_ms)
  for _, gone in ipairs(reaped) do
    drop_replica(gone)
  end

  local i = 8
  local n_held = tonumber(ARGV[i])
  local held = {}
  for j = 1, n_held do
    held[j] = { ARGV[i + 2 * j - 1], tonumber(ARGV[i + 2 * j]) }
  end
  i = i + 2 * n_held + 1
  local n_caps = tonumber(ARGV[i])
  local caps = {}
  for j = 1, n_caps do
    local backend, cap = ARGV[i + 2 * j - 1], ARGV[i + 2 * j]
    caps[backend] = tonumber(cap)
    redis.call('HSET', CAPS, backend, cap)
  end
  -- Caps nobody renews any more and nobody holds slots of are stale: drop them.
  local known = redis.call('HKEYS', CAPS)
  for _, backend in ipairs(known) do
    if not caps[backend] and redis.call('HEXISTS', TOTAL, backend) == 0 then
      redis.call('HDEL', CAPS, backend)
    end
  end
  i = i + 2 * n_caps + 1
  redis.call('HSET', LIMITS, 'rate_per_second', ARGV[i], 'rate_burst', ARGV[i + 1],
    'client_per_second', ARGV[i + 2], 'client_burst', ARGV[i + 3])
  i = i + 4
  local n_clients = tonumber(ARGV[i]) or 0

  local excess = {}
  if resync then
    -- Replace whatever Redis believes this replica holds by what it holds.
    local key = held_key(replica)
    local old = redis.call('HGETALL', key)
    for j = 1, #old, 2 do
      add_to(TOTAL, old[j], -tonumber(old[j + 1]))
    end
    redis.call('DEL', key)
    for _, entry in ipairs(held) do
      local backend, count = entry[1], entry[2]
      if count > 0 then
        redis.call('HSET', key, backend, count)
        local total = add_to(TOTAL, backend, count)
        local cap = caps[backend]
        if cap and total > cap then
          excess[#excess + 1] = backend
          excess[#excess + 1] = math.min(total - cap, count)
        end
      end
    end
    -- The same for its clients' counts (never over a cap by more than it holds).
    local ckey = clients_key(replica)
    give_back(ckey, CLIENTS)
    for j = 1, n_clients do
      local client, count = ARGV[i + 2 * j - 1], tonumber(ARGV[i + 2 * j])
      if count > 0 then
        redis.call('HSET', ckey, client, count)
        add_to(CLIENTS, client, count)
      end
    end
    redis.call('HSET', LEASE, replica, ARGV[7])
  elseif not session_ok(replica, token) then
    return { 'lost', redis.call('ZCARD', REPLICAS), rate_offset(now), {}, {}, reaped, {}, num(now) }
  end
  redis.call('ZADD', REPLICAS, now_ms + ttl_ms, replica)
  redis.call('HSET', RENEWED, replica, now_ms)
  return {
    'ok',
    redis.call('ZCARD', REPLICAS),
    rate_offset(now),
    redis.call('HGETALL', TOTAL),
    excess,
    reaped,
    redis.call('HGETALL', held_key(replica)),
    num(now),
  }
end

-- ARGV: op, deadline, replica, token.  A clean shutdown gives every slot back at once.
local function leave()
  if session_ok(ARGV[3], ARGV[4]) then
    drop_replica(ARGV[3])
    return 1
  end
  return 0
end

-- ARGV: op, deadline, per_second, burst, want.  Reply: how many closes may happen now.
local function close_tokens()
  local per_second, burst, want = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
  local now = now_us()
  local interval = 1000000 / per_second
  local tat = tonumber(redis.call('GET', CLOSE))
  local base = now
  if tat and tat > now then
    base = tat
  end
  local available = math.floor((burst * interval - (base - now)) / interval + 1e-9)
  local granted = math.max(0, math.min(want, available))
  if granted > 0 then
    store_tat(CLOSE, base + granted * interval, now)
  end
  return granted
end

-- Read-only: everything `wsgate state` shows, from one instant.
local function inspect()
  local now = now_us()
  local replicas = redis.call('ZRANGE', REPLICAS, 0, -1, 'WITHSCORES')
  local held = {}
  for i = 1, #replicas, 2 do
    held[#held + 1] = replicas[i]
    held[#held + 1] = redis.call('HGETALL', held_key(replicas[i]))
  end
  return {
    num(now),
    replicas,
    redis.call('HGETALL', RENEWED),
    redis.call('HGETALL', TOTAL),
    redis.call('HGETALL', CAPS),
    redis.call('HGETALL', LIMITS),
    rate_offset(now),
    held,
    redis.call('HLEN', CLIENTS),
  }
end

local ops = {
  admit = admit,
  release = release,
  renew = renew,
  leave = leave,
  close_tokens = close_tokens,
  inspect = inspect,
}
local op = ops[ARGV[1]]
if not op then
  return redis.error_reply('wsgate: unknown operation ' .. tostring(ARGV[1]))
end
-- A call its replica has given up on (it timed out while queued or while Redis
-- was frozen) must not take effect when it finally runs: ARGV[2] is the server
-- time (us) after which it is void; 0 for calls that are harmless when late.
local deadline = tonumber(ARGV[2]) or 0
if deadline > 0 and now_us() > deadline then
  return { 'late' }
end
return op()
