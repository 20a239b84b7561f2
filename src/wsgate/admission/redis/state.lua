--[[
wsgate shared admission state: the one script every replica runs.

THEORY OF OPERATION
===================

Everything that changes the shared admission state lives in this script; a
replica never writes these keys with plain commands. Redis runs one script at a
time, so each operation below is atomic: no replica ever sees (or acts on) a
half-done decision. The calls a replica makes while its last batch is out go
together as one 'batch' call: they run in order in one run of the script, each
decided on what the ones before it left, as if each had been its own.

Keys (all share the hash tag {wsgate:NS}, so in a Redis Cluster they live in
one slot and one script may touch them all; KEYS[1] is always P:replicas and P
is derived from it):

  P:replicas      ZSET  replica -> lease expiry, server ms     (register/renew/reap)
  P:lease         HASH  replica -> session token              (register/reap)
  P:renewed       HASH  replica -> last renewal, server ms    (renew/reap)
  P:held:R        HASH  backend -> live slots held by R       (admit/release/register/reap)
  P:total         HASH  backend -> live slots, all replicas   (admit/release/register/reap)
  P:caps          HASH  backend -> cap of the last pool naming it (pool updates)
  P:pool:R        HASH  backend -> cap, R's eligible backends  (pool updates by R, reap)
  P:order:R       ZSET  backend -> position in R's pool order  (pool updates by R, reap)
  P:pver:R        STR   version of R's pool held here          (pool updates by R, reap)
  P:members       HASH  backend -> how many replicas' pools name it (pool updates, reap)
  P:load          ZSET  backend -> total/cap, every member     (whenever total changes)
  P:limits        HASH  connect-rate settings                 (renew; display only)
  P:rate          STR   GCRA TAT of the global connect rate, server us (admit)
  P:rate:ip:IP    STR   GCRA TAT of one client IP, expires when full (admit)
  P:clients       HASH  client IP -> live connections, all replicas (admit/release/register/reap)
  P:clients:R     HASH  client IP -> live connections held by R     (admit/release/register/reap)
  P:close         STR   GCRA TAT of the shared rebalance-close budget (close_tokens)
  P:clock         STR   server ms of the last renewal by anyone (renew)
  P:epoch         STR   server us when this data set began      (renew, once)
  P:settling      STR   present for one lease after a loss of data was seen (renew)
  P:presence      HASH  replica -> "run_id:client_id" of the connection it holds
                        open to watch it by                       (renew/depart/reap)
  P:seen          HASH  replica -> server ms until which it said it lives (renew/alive/reap)

The invariant this script keeps, after every operation:

  total[b] == sum over registered replicas R of held:R[b]     (for every b)
  clients[c] == sum over registered replicas R of clients:R[c] (for every client c)

and an admission increments total[b] only while total[b] < cap(b). Alongside,
load[b] == total[b] / caps[b] for every backend some replica's pool names, so
the least loaded backend with room is the first of P:load below 1, found
without reading the pool. So as long
as every live connection is counted in the held hash of a registered replica,
no backend gets more connections than its cap. "Registered" means: present in
P:replicas and P:lease.

A client's field is deleted when its count reaches 0, so P:clients holds only
the clients that have a connection: it never grows with clients gone. Only
connections admitted under max_connections_per_client are counted there, and
an admission increments clients[c] only while clients[c] < that cap.

Who may change what:
  admit    increments total[b] and held:R[b] together, and spends the rate
           tokens, only for the caller's own R and only with R's current
           session token and an unexpired lease. It carries R's pool version
           and what changed since the version R last saw acknowledged; a
           version this script does not hold asks R for its whole pool.
  release  decrements both together, only with R's current token, never below 0.
  register (renew with resync=1) sets held:R to the replica's own local truth
           (the connections it really has open), moves total by the
           difference, and issues a new session token; operations still in
           flight with the old token are refused when they arrive, so a
           command that timed out on the client can never change the state
           after the replica has re-registered.
  renew    extends R's lease and reaps every replica whose lease has
           expired: their held counts are subtracted from total and all their
           keys deleted, in the same step. It also records which connection
           R holds open to Redis for others to watch (P:presence).
  alive    records that R lives, and will say so again within a while (P:seen),
           with R's current token.
  depart   reaps R at once, as an expired lease would be, but only while
           P:presence still names the connection the caller found closed and
           the while R last promised to be heard from again is over (P:seen).

What happens on a crash:
  - A replica dies: it stops renewing; the first renewal by anyone after its
    lease expires gives its slots back (lease_ttl plus at most one renewal
    period). Its connections died with it, so the counts match the truth.
    Sooner, when its process ended on a host that stayed up: the kernel
    closed its connections, so the one it named in P:presence is gone from
    the server's client list, and the first replica to see that calls depart
    (a replica cut off by the network keeps its connection open on the
    server's side and is left to its lease). A living replica says so every
    second on another connection (alive); depart leaves alone one that said so
    lately, whose watched connection was only reset. An entry is judged only
    on the server whose run_id it names: after a failover or a restart the
    client ids are another server's, and nobody departs until each replica has
    named its connection there.
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
    the truths again within one renewal period. Until then they lack what
    the replicas not yet back hold, so admitting against them could pass a
    cap. Every renew carries the epoch its replica last saw (P:epoch, made
    anew with the data); a replica that knew another epoch has seen the loss,
    and P:settling is set for one lease_ttl (not extended by later sightings).
    While it exists every renew reports its time left and no replica admits
    through Redis; by its end every live replica has registered again. A
    first start has no epoch to compare, so an empty Redis delays nobody.
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
local MEMBERS = P .. ':members'
local LOAD = P .. ':load'
local LIMITS = P .. ':limits'
local RATE = P .. ':rate'
local CLOSE = P .. ':close'
local CLOCK = P .. ':clock'
local EPOCH = P .. ':epoch'
local SETTLING = P .. ':settling'
local CLIENTS = P .. ':clients'
local PRESENCE = P .. ':presence'
local SEEN = P .. ':seen'

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

-- Change total[b] and keep load[b] in step (only for backends some pool names).
local function add_total(backend, delta)
  local total = add_to(TOTAL, backend, delta)
  local cap = tonumber(redis.call('HGET', CAPS, backend))
  if cap and cap > 0 then
    redis.call('ZADD', LOAD, 'XX', math.max(total, 0) / cap, backend)
  end
  if total <= 0 and redis.call('HEXISTS', MEMBERS, backend) == 0 then
    redis.call('HDEL', CAPS, backend)
  end
  return total
end

local function pool_keys(replica)
  return P .. ':pool:' .. replica, P .. ':order:' .. replica, P .. ':pver:' .. replica
end

local function leave_pool(backend)
  if redis.call('HINCRBY', MEMBERS, backend, -1) <= 0 then
    redis.call('HDEL', MEMBERS, backend)
    redis.call('ZREM', LOAD, backend)
    if redis.call('HEXISTS', TOTAL, backend) == 0 then
      redis.call('HDEL', CAPS, backend)
    end
  end
end

local function drop_pool(replica)
  local pool, order, version = pool_keys(replica)
  local names = redis.call('HKEYS', pool)
  for _, backend in ipairs(names) do
    leave_pool(backend)
  end
  redis.call('DEL', pool, order, version)
end

-- One entry of a pool update: cap 0 takes the backend out of R's pool.
local function set_member(pool, order, backend, cap, position)
  local known = redis.call('HEXISTS', pool, backend) == 1
  if cap <= 0 then
    if known then
      redis.call('HDEL', pool, backend)
      redis.call('ZREM', order, backend)
      leave_pool(backend)
    end
    return
  end
  if not known then
    redis.call('HINCRBY', MEMBERS, backend, 1)
  end
  redis.call('HSET', pool, backend, cap)
  redis.call('ZADD', order, position, backend)
  redis.call('HSET', CAPS, backend, cap)
  local total = tonumber(redis.call('HGET', TOTAL, backend)) or 0
  redis.call('ZADD', LOAD, total / cap, backend)
end

local function session_ok(replica, token)
  return redis.call('HGET', LEASE, replica) == token
end

-- Subtract what a replica holds in one of its hashes from the matching totals
-- (``add(field, delta)``) and delete the hash.
local function give_back(key, add)
  local held = redis.call('HGETALL', key)
  for i = 1, #held, 2 do
    add(held[i], -tonumber(held[i + 1]))
  end
  redis.call('DEL', key)
end

local function add_client(client, delta)
  return add_to(CLIENTS, client, delta)
end

-- Forget a replica and give back every slot it held (and its clients' counts), in one step.
local function drop_replica(replica)
  give_back(held_key(replica), add_total)
  give_back(clients_key(replica), add_client)
  drop_pool(replica)
  redis.call('HDEL', LEASE, replica)
  redis.call('HDEL', RENEWED, replica)
  redis.call('HDEL', PRESENCE, replica)
  redis.call('HDEL', SEEN, replica)
  redis.call('ZREM', REPLICAS, replica)
end

-- ARGV: op, deadline, replica, token, least_loaded, rate_ps, rate_burst,
--       client_key, client_ps, client_burst, client_cap (0 for none),
--       pool_base, pool_version, pool_reset, n_pool, (backend, cap, position) * n_pool,
--       n_first, backend * n_first, n_exclude, backend * n_exclude.
-- Reply: status, backend, retry_after_us, rate_offset_us, live_replicas,
--        the chosen backend's total after the decision, the pool version held here.
-- Status 'pool': this script holds another version of R's pool than the update
-- starts from; R sends its whole pool (pool_reset 1) with its next admission.
local function admit(argv)
  local replica, token = argv[3], argv[4]
  local now = now_us()
  if not session_ok(replica, token) then
    return { 'stale' }
  end
  local expiry = tonumber(redis.call('ZSCORE', REPLICAS, replica))
  if not expiry or expiry * 1000 < now then
    return { 'stale' }
  end

  local pool, order, version_key = pool_keys(replica)
  local held_version = redis.call('GET', version_key) or ''
  local version = argv[13]
  local n_pool = tonumber(argv[15])
  local i = 16
  if held_version ~= version then
    local reset = argv[14] == '1'
    if not reset and held_version ~= argv[12] then
      return { 'pool', held_version }
    end
    if reset then
      drop_pool(replica)
    end
    for j = 0, n_pool - 1 do
      set_member(pool, order, argv[i + 3 * j], tonumber(argv[i + 3 * j + 1]), tonumber(argv[i + 3 * j + 2]))
    end
    redis.call('SET', version_key, version)
  end
  i = i + 3 * n_pool
  local n_first = tonumber(argv[i])
  local first = {}
  for j = 1, n_first do
    first[j] = argv[i + j]
  end
  i = i + n_first + 1
  local excluded = {}
  for j = 1, tonumber(argv[i]) do
    excluded[argv[i + j]] = true
  end

  -- The same rule as contract.choose_backend; keep them in step. Each test is
  -- O(1) or O(log n); scans go only as far as the first backend with room.
  local function room(backend)
    if excluded[backend] then
      return false
    end
    local cap = tonumber(redis.call('HGET', pool, backend))
    if not cap then
      return false
    end
    return (tonumber(redis.call('HGET', TOTAL, backend)) or 0) < cap
  end
  local best
  for j = 1, n_first do
    if room(first[j]) then
      best = first[j]
      break
    end
  end
  -- The first backend with room, page by page, as far as it takes.
  local function first_with_room(page_of)
    local page, offset = 16, 0
    while true do
      local ids = page_of(offset, page)
      for _, backend in ipairs(ids) do
        if room(backend) then
          return backend
        end
      end
      if #ids < page then
        return nil
      end
      offset = offset + page
    end
  end
  if not best and argv[5] == '1' then
    -- Least loaded by share of cap, ties to the smallest id (P:load's own order).
    best = first_with_room(function(offset, page)
      return redis.call('ZRANGEBYSCORE', LOAD, '-inf', '(1', 'LIMIT', offset, page)
    end)
  elseif not best then
    -- First fit in R's pool order.
    best = first_with_room(function(offset, page)
      return redis.call('ZRANGE', order, offset, offset + page - 1)
    end)
  end

  local live = redis.call('ZCARD', REPLICAS)
  local function reply(status, backend, wait, total)
    return { status, backend, num(wait), rate_offset(now), live, total, version }
  end

  if not best then
    return reply('no_capacity', '', 0, 0)
  end

  -- max_connections_per_client (argv[11], 0 for none): a capacity too, checked
  -- before any token is spent; counted in P:clients and P:clients:R on admission.
  local client_cap = tonumber(argv[11])
  local counted_client = nil
  if argv[8] ~= '' and client_cap > 0 then
    counted_client = argv[8]
    if (tonumber(redis.call('HGET', CLIENTS, counted_client)) or 0) >= client_cap then
      return reply('client_connection_limit', '', 0, 0)
    end
  end

  -- Capacity first, then the rates; tokens are spent only when admitted.
  local rate_ps = tonumber(argv[6])
  local rate_tat
  if rate_ps > 0 then
    local ok, tat, wait = gcra(tonumber(redis.call('GET', RATE)), now, rate_ps, tonumber(argv[7]))
    if not ok then
      return reply('rate_limited', '', wait, 0)
    end
    rate_tat = tat
  end
  local client_key, client_tat
  local client_ps = tonumber(argv[9])
  if argv[8] ~= '' and client_ps > 0 then
    client_key = P .. ':rate:ip:' .. argv[8]
    local ok, tat, wait = gcra(tonumber(redis.call('GET', client_key)), now, client_ps, tonumber(argv[10]))
    if not ok then
      return reply('client_rate_limited', '', wait, 0)
    end
    client_tat = tat
  end

  if rate_tat then
    store_tat(RATE, rate_tat, now)
  end
  if client_tat then
    store_tat(client_key, client_tat, now)
  end
  redis.call('HINCRBY', held_key(replica), best, 1)
  if counted_client then
    add_client(counted_client, 1)
    add_to(clients_key(replica), counted_client, 1)
  end
  return reply('ok', best, 0, add_total(best, 1))
end

-- ARGV: op, deadline, replica, token, backend, client ('' when the slot counts for none).
-- Reply: status, total of that backend.
local function release(argv)
  local replica, token, backend = argv[3], argv[4], argv[5]
  if not session_ok(replica, token) then
    return { 'stale', 0 }
  end
  local client = argv[6] or ''
  if client ~= '' and (tonumber(redis.call('HGET', clients_key(replica), client)) or 0) > 0 then
    add_to(clients_key(replica), client, -1)
    add_to(CLIENTS, client, -1) -- deleted at 0: a client gone leaves no key behind
  end
  local key = held_key(replica)
  if (tonumber(redis.call('HGET', key, backend)) or 0) <= 0 then
    return { 'ok', tonumber(redis.call('HGET', TOTAL, backend)) or 0 }
  end
  add_to(key, backend, -1)
  return { 'ok', math.max(add_total(backend, -1), 0) }
end

-- ARGV: op, deadline, replica, token, ttl_ms, resync, new_token,
--       n_held, (backend, count) * n_held, n_caps, (backend, cap) * n_caps,
--       rate_ps, rate_burst, client_ps, client_burst, epoch this replica last saw ('' if none),
--       presence ("run_id:client_id" of the connection it holds open to be watched by, or ''),
--       alive_ms (with a presence: how long it promises to say it lives again within),
--       n_clients, (client, count) * n_clients (resync only: the clients' truth).
-- The caps are sent with a resync, for the backends in it: the excess is
-- judged by them (the pools may not be here yet, after Redis lost its data).
-- Reply: status, live_replicas, rate_offset_us, {total flat}, {excess flat}, {reaped},
--        {this replica's held, flat}, server time (us), epoch, settling ms left.
local function renew(argv)
  local replica, token = argv[3], argv[4]
  local ttl_ms = tonumber(argv[5])
  local resync = argv[6] == '1'
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
  local n_held = tonumber(argv[i])
  local held = {}
  for j = 1, n_held do
    held[j] = { argv[i + 2 * j - 1], tonumber(argv[i + 2 * j]) }
  end
  i = i + 2 * n_held + 1
  local n_caps = tonumber(argv[i])
  local caps = {}
  for j = 1, n_caps do
    caps[argv[i + 2 * j - 1]] = tonumber(argv[i + 2 * j])
  end
  i = i + 2 * n_caps + 1
  redis.call('HSET', LIMITS, 'rate_per_second', argv[i], 'rate_burst', argv[i + 1],
    'client_per_second', argv[i + 2], 'client_burst', argv[i + 3])
  local known = argv[i + 4] or ''
  local presence = argv[i + 5] or ''
  local alive_ms = tonumber(argv[i + 6]) or 0
  i = i + 7
  local n_clients = tonumber(argv[i]) or 0

  -- A replica that saw another epoch was registered in data Redis has lost.
  local epoch = redis.call('GET', EPOCH)
  if not epoch then
    epoch = num(now)
    redis.call('SET', EPOCH, epoch)
  end
  if known ~= '' and known ~= epoch then
    redis.call('SET', SETTLING, known, 'PX', ttl_ms, 'NX')
  end
  local settling = math.max(redis.call('PTTL', SETTLING), 0)

  local excess = {}
  if resync then
    -- Replace whatever Redis believes this replica holds by what it holds.
    local key = held_key(replica)
    local old = redis.call('HGETALL', key)
    for j = 1, #old, 2 do
      add_total(old[j], -tonumber(old[j + 1]))
    end
    redis.call('DEL', key)
    for _, entry in ipairs(held) do
      local backend, count = entry[1], entry[2]
      if count > 0 then
        redis.call('HSET', key, backend, count)
        local cap = caps[backend]
        if cap then
          redis.call('HSETNX', CAPS, backend, cap)
        end
        local total = add_total(backend, count)
        if cap and total > cap then
          excess[#excess + 1] = backend
          excess[#excess + 1] = math.min(total - cap, count)
        end
      end
    end
    -- The same for its clients' counts (never over a cap by more than it holds).
    local ckey = clients_key(replica)
    give_back(ckey, add_client)
    for j = 1, n_clients do
      local client, count = argv[i + 2 * j - 1], tonumber(argv[i + 2 * j])
      if count > 0 then
        redis.call('HSET', ckey, client, count)
        add_to(CLIENTS, client, count)
      end
    end
    redis.call('HSET', LEASE, replica, argv[7])
  elseif not session_ok(replica, token) then
    return {
      'lost', redis.call('ZCARD', REPLICAS), rate_offset(now), {}, {}, reaped, {}, num(now),
      epoch, settling,
    }
  end
  redis.call('ZADD', REPLICAS, now_ms + ttl_ms, replica)
  redis.call('HSET', RENEWED, replica, now_ms)
  if presence ~= '' then
    redis.call('HSET', PRESENCE, replica, presence)
    redis.call('HSET', SEEN, replica, now_ms + alive_ms)
  else
    redis.call('HDEL', PRESENCE, replica)
  end
  return {
    'ok',
    redis.call('ZCARD', REPLICAS),
    rate_offset(now),
    redis.call('HGETALL', TOTAL),
    excess,
    reaped,
    redis.call('HGETALL', held_key(replica)),
    num(now),
    epoch,
    settling,
  }
end

-- ARGV: op, deadline, replica, token.  A clean shutdown gives every slot back at once.
local function leave(argv)
  if session_ok(argv[3], argv[4]) then
    drop_replica(argv[3])
    return 1
  end
  return 0
end

-- ARGV: op, deadline, replica, token, quiet_ms.  The replica lives, and will
-- say so again within quiet_ms: until then depart leaves it alone.
local function alive(argv)
  if session_ok(argv[3], argv[4]) then
    redis.call('HSET', SEEN, argv[3], math.floor(now_us() / 1000) + tonumber(argv[5]))
    return 1
  end
  return 0
end

-- ARGV: op, deadline, replica, presence.  The caller found the connection
-- `presence` names closed on this server: the replica's process is gone, so its
-- slots are given back now rather than when its lease expires. Nothing happens
-- if the replica has named another connection since (it came back), or is
-- within the while it last said it lives for (only that connection was reset).
local function depart(argv)
  local replica = argv[3]
  if redis.call('HGET', PRESENCE, replica) ~= argv[4] then
    return 0
  end
  local seen_until = tonumber(redis.call('HGET', SEEN, replica)) or 0
  if math.floor(now_us() / 1000) <= seen_until then
    return 0
  end
  drop_replica(replica)
  return 1
end

-- ARGV: op, deadline, per_second, burst, want.  Reply: how many closes may happen now.
local function close_tokens(argv)
  local per_second, burst, want = tonumber(argv[3]), tonumber(argv[4]), tonumber(argv[5])
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
local function inspect(argv)
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
    redis.call('HGETALL', PRESENCE),
    redis.call('HGETALL', SEEN),
  }
end

local ops = {
  admit = admit,
  release = release,
  renew = renew,
  leave = leave,
  alive = alive,
  depart = depart,
  close_tokens = close_tokens,
  inspect = inspect,
}

-- One call: its operation with its own ARGV. A call its replica has given up on
-- (it timed out while queued or while Redis was frozen) must not take effect
-- when it finally runs: argv[2] is the server time (us) after which it is void;
-- 0 for calls that are harmless when late.
local function run(argv)
  local op = ops[argv[1]]
  if not op then
    return redis.error_reply('wsgate: unknown operation ' .. tostring(argv[1]))
  end
  local deadline = tonumber(argv[2]) or 0
  if deadline > 0 and now_us() > deadline then
    return { 'late' }
  end
  return op(argv)
end

-- ARGV: 'batch', n, then n calls, each as its length and its own ARGV.
-- Reply: each call's own reply, in order (an error reply for one that failed).
-- The calls a replica made while its last batch was out run one after another
-- in one run of the script: each is still decided on the state the ones before
-- it left, and the script's set-up above is paid once for all of them. A call
-- that raises an error fails alone, as it would in a run of its own: what it
-- wrote before the error stays, as it would there too.
if ARGV[1] == 'batch' then
  local replies = {}
  local at = 3
  for k = 1, tonumber(ARGV[2]) do
    local length = tonumber(ARGV[at])
    local argv = {}
    for j = 1, length do
      argv[j] = ARGV[at + j]
    end
    local ok, reply = pcall(run, argv)
    if ok then
      replies[k] = reply or false
    else
      replies[k] = redis.error_reply(tostring(reply))
    end
    at = at + length + 1
  end
  return replies
end
return run(ARGV)
