-- Check and charge, as `guard(K0)`: reads its keys from KEYS[K0 + 1] and its
-- arguments from ARGV[A0 + 1] (A0 is the script's, see args.lua or the queue's
-- guarded enqueue), so that it runs alone (charge_main.lua) or before an enqueue
-- in the same call. Returns allowed, reply. The Rust twin is window.rs.
--
-- KEYS: one counter hash per key group, then the key index (the last key)
-- ARGV: now ('' = Redis TIME), then three lists of doubles, each as its struct
--   format and its bytes:
--   F, read by every check: group count, then per group: the version of the key's
--     state the caller remembers (0: none), the times from and until which that
--     state needs no change here (no bucket to start or drop, no expiry to push),
--     request count, then per request: cost, its quota's place among the tallies,
--     its headroom (the least, over its windows, of limit minus remembered total);
--   N, read when a key's state is read whole: per group: ttl ms, request count,
--     then per request: cost, quota id, window count, then per window: tag, limit;
--   S, read for a window the key has no record of: per window: window ms, bucket
--     ms.
--   Then per group its key (the index member).
-- Returns whether all fit, and little-endian doubles, either
--   1, allowed (1/0), now, then per group, request and window: used, retry_at (0
--   fits, -1 never), free_at (0 when a unit is free); or, when all fit and every
--   window still has a unit free (retry_at and free_at all 0),
--   2, now, then per group: the lengths of its `k`, `h` and `a`, then those as
--   stored (`k` and `h` empty when the remembered ones were used): a window's used
--   count is its total plus its quota's tally.
local function guard(K0)
  local index = KEYS[#KEYS]
  local F = {unpack4(ARGV[A0 + 2], ARGV[A0 + 3])}
  local N, S
  -- Per group: {true, tallies, their length} when checked from its tallies, else
  -- {false, records, length, totals, length, tallies, whether `k` changed, `k` as
  -- stored, ttl, `h` as stored, tallies' length, what each request adds (quota id,
  -- cost), each quota's place among the tallies}; for a key with no state yet,
  -- the tallies to write instead of what each request adds, no places, and true.
  local G = {}
  local allowed, full, slow = true, false, false
  -- Charges to take back if a later check fails: by tally (tallies, place, cost), and
  -- by window: the last one charged, those whose charge started a bucket (what it
  -- replaced) or went to an earlier one (false: Redis TIME went back).
  local done, nd, charged, moved = {}, 0, 0, nil
  -- Windows whose record is not where the previous window's ended (by window number).
  local jump
  -- Bucket fields to write once all fit: key, field, units, whether to add.
  local fin, nfin = nil, 0
  local p = 2
  -- The keys checked from their tallies alone: the loop most checks run, so as few
  -- steps as it takes.
  for g = 1, F[1] do
    local kver, nreq = F[p], F[p + 3]
    local A, nA
    if kver > 0 and now >= F[p + 1] and now < F[p + 2] then
      local ab = redis.call('HGET', KEYS[K0 + g], 'a')
      if ab then
        A, nA = doubles(ab)
        if A[1] ~= kver then A = nil end
      end
    end
    p = p + 4
    if A then
      for _ = 1, nreq do
        local s, c, H = F[p + 1] + 2, F[p], F[p + 2]
        local t = A[s] + c
        if t > H then
          allowed = false
        elseif allowed then
          A[s] = t
          done[nd + 1], done[nd + 2], done[nd + 3] = A, s, c
          nd = nd + 3
          if t == H then full = true end
        end
        p = p + 3
      end
      G[g] = {true, A, nA}
    else
      p = p + 3 * nreq
      slow = true
    end
  end

  -- The other keys: their state whole, tallies settled, every window checked.
  if slow then
    N = {unpack4(ARGV[A0 + 4], ARGV[A0 + 5])}
    local q, n = 1, 0
    for g = 1, F[1] do
      local ttl, nreq = N[q], N[q + 1]
      q = q + 2
      local key = KEYS[K0 + g]
      local v, nv, h, nh, A, nA, kb, hb
      if not G[g] then v, nv, h, nh, A, nA, kb, hb = load(key) end
      if G[g] then
        for _ = 1, nreq do
          local nw = N[q + 2]
          q, n = q + 3 + 2 * nw, n + nw
        end
      elseif kb == nil then
        -- A key Redis holds no state of (a sender not seen within its windows, the
        -- first check of most senders): every window starts empty, so its records
        -- are built in order, as the general path below would build them, with no
        -- lookups, no settling and none of the helpers; its tallies are zeros.
        S = S or {unpack4(ARGV[A0 + 6], ARGV[A0 + 7])}
        local o, oh, a, na, seen = 2, 1, {A[1] + 1}, 1, {}
        for _ = 1, nreq do
          local c, qid, nw = N[q], N[q + 1], N[q + 2]
          q = q + 3
          if not seen[qid] then
            seen[qid] = true
            na = na + 1
            a[na] = 0
          end
          for _ = 1, nw do
            n = n + 1
            local tag, lim = N[q], N[q + 1]
            local Wi, bi = S[2 * n - 1], S[2 * n]
            q = q + 2
            v[o], v[o + 1], v[o + 2], v[o + 3], v[o + 4], v[o + 5] =
              tag, Wi, bi, (floor((now + 1 - Wi) / bi) + 1) * bi + Wi - 1, (floor(now / bi) + 1) * bi, qid
            if c > lim then
              allowed = false
              h[oh], h[oh + 1] = 0, 0
            elseif allowed then
              h[oh], h[oh + 1] = c, c
              charged = n
              if c >= lim then full = true end
            else
              h[oh], h[oh + 1] = 0, 0
            end
            o, oh = o + REC, oh + HOT
          end
        end
        -- Fields 7 (cold) and 14 (fresh): written whole, by the fresh path below.
        G[g] = {false, v, o - 1, h, oh - 1, A, true, nil, ttl, nil, na, a, nil, true}
      else
        helpers()
        local slots = settle(v, nv, h, A)
        local cold = kb == nil
        -- What this check adds to each quota's tally (quota id, cost), if `k` stays
        -- as it is: then only `a` is written, under the same version, so that
        -- checks by tallies already on their way still match.
        local add = {}
        -- Records are kept in the order of the last check, so a window's record is
        -- usually where the previous one's ended.
        local o = 2
        for r = 1, nreq do
          local c, qid, nw = N[q], N[q + 1], N[q + 2]
          q = q + 3
          add[2 * r - 1], add[2 * r] = qid, c
          for _ = 1, nw do
            n = n + 1
            local tag, lim = N[q], N[q + 1]
            q = q + 2
            if o >= nv or v[o] ~= tag then
              o = find(v, nv, tag)
              if not o then
                -- A window the key has no record of (yet, or any more): an empty
                -- one, kept only if the state is written.
                S = S or {unpack4(ARGV[A0 + 6], ARGV[A0 + 7])}
                local Wi, bi = S[2 * n - 1], S[2 * n]
                o = nv + 1
                v[o], v[o + 1], v[o + 2], v[o + 3], v[o + 4], v[o + 5] =
                  tag, Wi, bi, (lower_of(Wi, bi) + 1) * bi + Wi - 1, (floor(now / bi) + 1) * bi, qid
                nv = nv + REC
                h[nh + 1], h[nh + 2] = 0, 0
                nh = nh + HOT
                cold = true
              end
              jump = jump or {}
              jump[n] = o
            end
            local oh = (o - 2) / REC * HOT + 1
            if now >= v[o + 3] then
              -- The lowest bucket kept stopped counting: drop all that did (older
              -- buckets are fields below the latest one; at most a window's worth).
              cold = true
              local W, b = v[o + 1], v[o + 2]
              local lower, pre, cb = lower_of(W, b), prefix(tag), cb_of(v, o)
              local drop, ndrop = {}, 0
              local t = h[oh]
              -- Every unit counted in the latest bucket: there are no older bucket
              -- fields (they only ever hold units), so none to read or drop (the
              -- second check of a key a bucket or more after its first).
              if t ~= h[oh + 1] then
                for j = lo_of(v, o), min(lower, cb) - 1 do
                  ndrop = ndrop + 1
                  drop[ndrop] = pre .. j
                end
              end
              for i = 1, ndrop, CHUNK do
                local part = redis.call('HMGET', key, unpack(drop, i, min(ndrop, i + CHUNK - 1)))
                for k = 1, #part do
                  if part[k] then t = t - tonumber(part[k]) end
                end
              end
              hdel(key, drop, ndrop)
              if cb < lower then
                t = t - h[oh + 1]
                v[o + 4], h[oh + 1] = (lower + 1) * b, 0
              end
              h[oh], v[o + 3] = t, (lower + 1) * b + W - 1
            end
            local t = h[oh] + c
            if t > lim then
              allowed = false
            elseif allowed then
              local cbe = v[o + 4]
              if now < cbe and now >= cbe - v[o + 2] then
                h[oh + 1] = h[oh + 1] + c
              else
                moved = moved or {}
                fin = fin or {}
                if now >= cbe then
                  -- The latest bucket is finished: it becomes a field of its own.
                  moved[n] = {cbe, h[oh + 1]}
                  if h[oh + 1] > 0 then
                    fin[nfin + 1], fin[nfin + 2], fin[nfin + 3], fin[nfin + 4] =
                      key, prefix(tag) .. cb_of(v, o), h[oh + 1], false
                    nfin = nfin + 4
                  end
                  local b = v[o + 2]
                  v[o + 4], h[oh + 1] = (floor(now / b) + 1) * b, c
                  cold = true
                else
                  -- Redis TIME went back: charge the earlier bucket's field, or the
                  -- oldest bucket kept if it went back further (as the model does).
                  -- Not a tally (tallies count in the latest bucket): `h` is written.
                  moved[n] = false
                  cold = true
                  local j = math.max(floor(now / v[o + 2]), lo_of(v, o))
                  if j >= cb_of(v, o) then
                    moved[n] = nil
                    h[oh + 1] = h[oh + 1] + c
                  else
                    fin[nfin + 1], fin[nfin + 2], fin[nfin + 3], fin[nfin + 4] =
                      key, prefix(tag) .. j, c, true
                    nfin = nfin + 4
                  end
                end
              end
              h[oh] = t
              charged = n
              if t >= lim then full = true end
            end
            o = o + REC
          end
        end
        G[g] = {false, v, nv, h, nh, A, cold, kb, ttl, hb, nA, add, slots}
      end
    end
  end

  if not allowed then
    -- Take back what was charged before a window did not fit (in memory: nothing
    -- was written yet).
    helpers()
    full = true
    for i = 1, nd, 3 do
      local A, s = done[i], done[i + 1]
      A[s] = A[s] - done[i + 2]
    end
    if charged > 0 then
      local q, n = 1, 0
      for g = 1, F[1] do
        local Gg, nreq = G[g], N[q + 1]
        q = q + 2
        local o = 2
        for _ = 1, nreq do
          local c, nw = N[q], N[q + 2]
          q = q + 3
          for _ = 1, nw do
            n = n + 1
            if not Gg[1] and n <= charged then
              o = jump and jump[n] or o
              local v, h, oh = Gg[2], Gg[4], hot(o)
              h[oh] = h[oh] - c
              local m = moved and moved[n]
              if m then
                v[o + 4], h[oh + 1] = m[1], m[2]
              elseif m == nil then
                h[oh + 1] = h[oh + 1] - c
              end
            end
            q = q + 2
            o = o + REC
          end
        end
      end
    end
  end

  -- Write back. A finished bucket's field is set with the key's state (its key is
  -- written whole: a bucket moved), in one command.
  local sets
  if allowed then
    for i = 1, nfin, 4 do
      if fin[i + 3] then
        redis.call('HINCRBY', fin[i], fin[i + 1], fin[i + 2])
      else
        sets = sets or {}
        local x = sets[fin[i]] or {}
        x[#x + 1], x[#x + 2] = fin[i + 1], fin[i + 2]
        sets[fin[i]] = x
      end
    end
  end
  local reply = not full and {pack('<dd', 2, now)}
  for g = 1, F[1] do
    local key, Gg = KEYS[K0 + g], G[g]
    if Gg[1] then
      if allowed then
        local ab = encode(Gg[2], Gg[3])
        redis.call('HSET', key, 'a', ab)
        if reply then
          reply[#reply + 1] = pack('<ddd', 0, 0, Gg[3])
          reply[#reply + 1] = ab
        end
      end
    elseif Gg[14] then
      -- A new key: nothing to settle, drop or compare with, so its expiry and index
      -- entry are set without reading them first. Refused, it is not written at all
      -- (all its windows would hold nothing, as they do without it).
      if allowed then
        local v, nv, h, nh, _, _, _, ttl, _, na, a = unpack(Gg, 2, 12)
        local keep = ttl + floor(ttl / 16)
        v[1] = now + keep
        local kb, hb, ab = encode(v, nv), encode(h, nh), encode(a, na)
        redis.call('HSET', key, 'k', kb, 'h', hb, 'a', ab)
        redis.call('PEXPIRE', key, keep)
        redis.call('ZADD', index, now + keep, ARGV[A0 + 7 + g])
        if redis.call('PTTL', index) < keep then
          redis.call('PEXPIRE', index, keep)
        end
        redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
        if reply then
          reply[#reply + 1] = pack('<ddd', nv, nh, na)
          reply[#reply + 1] = kb
          reply[#reply + 1] = hb
          reply[#reply + 1] = ab
        end
      end
    elseif allowed or Gg[7] then
      helpers()
      local v, nv, h, nh, A, cold, kb, ttl, hb, nA, add, slots = unpack(Gg, 2, 13)
      local refresh = allowed and v[1] < now + ttl
      local keep = ttl + floor(ttl / 16)
      if refresh then
        -- The hash must outlive its counters: until ttl after this charge. Its expiry
        -- (and index entry) are pushed a sixteenth further than needed, and the time
        -- they are good until is kept in the state, so that most charges skip this;
        -- so does dropping the records nothing counts in any more.
        v[1] = now + keep
        v, nv, h, nh = live(key, v, nv, h)
        cold = true
      end
      local a, na, ab
      if cold then
        kb, hb = encode(v, nv), encode(h, nh)
        a, na = tallies(v, nv, A[1] + 1)
        ab = encode(a, na)
        local x = sets and sets[key]
        if x then
          redis.call('HSET', key, 'k', kb, 'h', hb, 'a', ab, unpack(x))
        else
          redis.call('HSET', key, 'k', kb, 'h', hb, 'a', ab)
        end
      else
        -- `k` and `h` as they were: the charges go to the tallies.
        a, na = A, nA
        for i = 1, #add, 2 do
          local s = slots[add[i]] + 1
          a[s] = (a[s] or 0) + add[i + 1]
        end
        for i = 2, na do a[i] = a[i] or 0 end
        ab = encode(a, na)
        redis.call('HSET', key, 'a', ab)
      end
      if refresh then
        -- Never shorten: the hash may hold longer windows of other quotas.
        if redis.call('PTTL', key) < keep then
          redis.call('PEXPIRE', key, keep)
        end
        local member = ARGV[A0 + 7 + g]
        local old = redis.call('ZSCORE', index, member)
        if not old or tonumber(old) < now + keep then
          redis.call('ZADD', index, now + keep, member)
        end
        if redis.call('PTTL', index) < keep then
          redis.call('PEXPIRE', index, keep)
        end
        redis.call('ZREMRANGEBYSCORE', index, '-inf', now)
      end
      if reply then
        reply[#reply + 1] = pack('<ddd', nv, nh, na)
        reply[#reply + 1] = kb
        reply[#reply + 1] = hb
        reply[#reply + 1] = ab
      end
    end
  end
  if reply then return true, table.concat(reply) end

  -- Somebody is at or over a limit: the caller needs when units free up. Keys
  -- checked from their tallies are read whole here, tallies settled (as stored).
  helpers()
  N = N or {unpack4(ARGV[A0 + 4], ARGV[A0 + 5])}
  local out, no = {1, allowed and 1 or 0, now}, 3
  local q, n = 1, 0
  for g = 1, F[1] do
    local key, Gg, nreq = KEYS[K0 + g], G[g], N[q + 1]
    q = q + 2
    local v, nv, h
    if Gg[1] then
      local _, A
      v, nv, h, _, A = load(key)
      settle(v, nv, h, A)
    else
      v, nv, h = Gg[2], Gg[3], Gg[4]
    end
    local o = 2
    for _ = 1, nreq do
      local c, nw = N[q], N[q + 2]
      q = q + 3
      for _ = 1, nw do
        n = n + 1
        local tag, lim = N[q], N[q + 1]
        q = q + 2
        if Gg[1] then
          o = find(v, nv, tag)
        else
          o = jump and jump[n] or o
        end
        local t = h[hot(o)]
        local retry, free = 0, 0
        if not allowed and t + c > lim then
          if c > lim then retry = -1 else retry = frees(key, v, o, h, t + c - lim) end
        end
        if t >= lim then
          free = frees(key, v, o, h, t + 1 - lim)
          if free < 0 then free = 0 end
        end
        out[no + 1], out[no + 2], out[no + 3] = t, retry, free
        no = no + 3
        o = o + REC
      end
    end
  end
  return allowed, pack(fmt(no), unpack(out, 1, no))
end
