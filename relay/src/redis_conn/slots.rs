//! Spreading keys over Redis Cluster slots: a fixed set of hash tags, one per equal
//! share of the slot range, and a stable pick of one of them by name.
//!
//! Why equal shares and not `{<name>}` itself: the admin reads (usage, shaping
//! states) must find every key, and a fixed list of tags gives each tag a small
//! index of its own, read by name, where per-name tags would need a `SCAN` of
//! every master. And `redis-cli --cluster create` gives each master an equal,
//! contiguous range of slots, so tags placed one per equal share of the range land
//! in equal numbers on every master (64 tags over 3 masters: 21, 21, 22), where 64
//! random slots would not.

/// Tags per spread key family.
pub const BUCKETS: usize = 64;
/// Redis Cluster's slot count.
pub const SLOTS: usize = 16384;

/// Redis Cluster's slot of a hash tag (CRC16/XMODEM, as `CLUSTER KEYSLOT`).
pub fn slot_of(tag: &str) -> usize {
    let mut crc: u16 = 0;
    for &b in tag.as_bytes() {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    usize::from(crc) % SLOTS
}

/// The key prefixes `<prefix>:{<family>:<b>.<n>}:` for `b` in `0..BUCKETS`, where
/// `n` is the first suffix that puts the tag's slot in the `b`-th share of the
/// range. Pure: every process and version computes the same list.
pub fn bucket_prefixes(prefix: &str, family: &str) -> Vec<String> {
    placed(prefix, family, BUCKETS, |b| {
        b * SLOTS / BUCKETS..(b + 1) * SLOTS / BUCKETS
    })
}

/// `count` key prefixes `<prefix>:{<family>:<b>.<n>}:`, tag `b` within 1/16 of a
/// share of its centre (the `b`-th `1/count` of the range). The centre, not just
/// the share: with 16 shards over 3 masters two shares straddle a master's
/// boundary, and a tag anywhere in them could land 6/4/6; at the centre a master
/// holds the shares whose centres it owns, as even as contiguous ranges allow
/// (5/6/5). Used by the Redis queue's shards; changing it renames their keys.
pub fn centred_prefixes(prefix: &str, family: &str, count: usize) -> Vec<String> {
    placed(prefix, family, count, |b| {
        let centre = (2 * b + 1) * SLOTS / (2 * count);
        let half = (SLOTS / count / 32).max(1);
        centre - half..centre + half
    })
}

fn placed(
    prefix: &str,
    family: &str,
    count: usize,
    window: impl Fn(usize) -> std::ops::Range<usize>,
) -> Vec<String> {
    (0..count)
        .map(|b| {
            let range = window(b);
            (0u32..)
                .map(|n| format!("{prefix}:{family}:{b}.{n}"))
                .find(|tag| range.contains(&slot_of(tag)))
                .map(|tag| format!("{prefix}:{{{tag}}}:"))
                .expect("some suffix lands in every slot range")
        })
        .collect()
}

/// Which bucket `name` goes to: FNV-1a, stable across processes and versions.
pub fn bucket_of(name: &str) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % BUCKETS as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn slots_are_redis_cluster_slots() {
        for k in [
            "",
            "mr:eg",
            "mr:eg:0.3",
            "123456789",
            "mx1.example,mx2.example",
        ] {
            assert_eq!(
                Slot::new(slot_of(k) as u16),
                Some(Slot::for_key(k)),
                "{k:?}"
            );
        }
        // The CRC16/XMODEM check value.
        assert_eq!(slot_of("123456789"), 0x31c3 % SLOTS);
    }

    #[test]
    fn buckets_cover_the_slot_range_evenly() {
        let t = bucket_prefixes("mr", "eg");
        assert_eq!(t.len(), BUCKETS);
        for (b, base) in t.iter().enumerate() {
            let tag = &base[base.find('{').unwrap() + 1..base.find('}').unwrap()];
            let slot = slot_of(tag);
            assert!(
                (b * SLOTS / BUCKETS..(b + 1) * SLOTS / BUCKETS).contains(&slot),
                "bucket {b}: {base} in slot {slot}"
            );
            assert!(base.starts_with("mr:{mr:eg:"), "{base}");
        }
        // 16 queue shards over the three equal ranges of `redis-cli --cluster
        // create` (0-5460, 5461-10922, 10923-16383): 5 / 6 / 5.
        let q = centred_prefixes("mr", "q", 16);
        let mut per_master = [0; 3];
        for base in &q {
            let tag = &base[base.find('{').unwrap() + 1..base.find('}').unwrap()];
            per_master[[5461, 10923, SLOTS]
                .iter()
                .position(|&e| slot_of(tag) < e)
                .unwrap()] += 1;
        }
        assert_eq!(per_master, [5, 6, 5], "{q:?}");
        // Names spread over every bucket.
        let used: std::collections::HashSet<usize> = (0..1000)
            .map(|i| bucket_of(&format!("mx{i}.example")))
            .collect();
        assert_eq!(used.len(), BUCKETS);
    }
}
