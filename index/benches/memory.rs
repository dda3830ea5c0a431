//! Index memory and speed at scale: inserts N records (default 10 million) and reports bytes
//! per record two ways (the tables' own count, and the growth of the process's resident set),
//! then lookups per second. Run: `cargo bench -p peregrine-index --bench memory [-- N]`.

use std::time::Instant;

use peregrine_index::{Digest, Entry, EntryFlags, Index, KeyRef, Location};

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

fn main() {
    let n: u64 = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(10_000_000);
    let digests: Vec<Digest> = (0..n).map(|i| Digest::of_key(b"bench", KeyRef::Int(i as i64))).collect();
    let before = rss_bytes();
    let index = Index::new();
    let started = Instant::now();
    for (i, d) in digests.iter().enumerate() {
        let e = Entry {
            digest: *d,
            set_id: 1,
            location: Location { device: 0, offset: (1 << 20) + i as u64 * 1104 / 16 * 16, size: 1104 },
            generation: 1,
            void_time: 0,
            last_update_ms: 1_700_000_000_000,
            flags: EntryFlags::empty(),
        };
        index.write(d.partition()).insert(e);
    }
    let insert_s = started.elapsed().as_secs_f64();
    let after = rss_bytes();
    let started = Instant::now();
    let mut found = 0u64;
    for d in digests.iter().rev() {
        found += u64::from(index.get(d).is_some());
    }
    let lookup_s = started.elapsed().as_secs_f64();
    assert_eq!(found, n);
    println!("records                      {n}");
    println!(
        "index bytes per record       {:.1} (table capacity, from Index::memory_bytes)",
        index.memory_bytes() as f64 / n as f64
    );
    println!(
        "resident growth per record   {:.1} (process RSS after - before inserting)",
        (after - before) as f64 / n as f64
    );
    println!("inserts per second           {:.0} (one thread)", n as f64 / insert_s);
    println!("lookups per second           {:.0} (one thread)", n as f64 / lookup_s);
}
