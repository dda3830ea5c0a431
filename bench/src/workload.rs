//! What each operation does: which key (uniform or scrambled Zipfian), read or write, and the
//! bytes written. Values derive from (key, version), and bin 0 starts with the version and the
//! key, so any read can be checked for the exact bytes it must hold.

use peregrine_engine::{Bin, BinName, Value};

use crate::cli::{SizeRange, Workload};

/// A fast, seedable generator (xorshift64*).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// YCSB's Zipfian generator, with ranks scrambled over the key space so hot keys are spread.
#[derive(Clone, Debug)]
pub struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zeta_n: f64,
    eta: f64,
}

impl Zipf {
    /// A distribution over 0..n with skew `theta` (0 < theta, theta != 1).
    pub fn new(n: u64, theta: f64) -> Zipf {
        let zeta = |count: u64| (1..=count).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zeta_n = zeta(n);
        let zeta_2 = zeta(2.min(n));
        let alpha = 1.0 / (1.0 - theta);
        let eta = (1.0 - (2.0 / n as f64).powf(1.0 - theta)) / (1.0 - zeta_2 / zeta_n);
        Zipf { n, theta, alpha, zeta_n, eta }
    }

    /// A rank in 0..n, rank 0 the most popular.
    pub fn rank(&self, rng: &mut Rng) -> u64 {
        let u = rng.next_f64();
        let uz = u * self.zeta_n;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1.min(self.n - 1);
        }
        ((self.n as f64 * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64).min(self.n - 1)
    }

    /// A key: the rank scrambled by a hash, so popular keys are not neighbours.
    pub fn key(&self, rng: &mut Rng) -> u64 {
        scramble(self.rank(rng)) % self.n
    }
}

fn scramble(x: u64) -> u64 {
    let mut h = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    h ^ (h >> 31)
}

/// One operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read these keys (one key, or a batch).
    Read(Vec<u64>),
    /// Write a key: merge (update) or replace.
    Write {
        /// The key.
        key: u64,
        /// Replace instead of update.
        replace: bool,
    },
}

/// Chooses operations and keys.
#[derive(Clone, Debug)]
pub struct Chooser {
    keys: u64,
    workload: Workload,
    zipf: Option<Zipf>,
    batch_size: u32,
    /// With `--verify`, task `t` of `c` only touches keys k with k % c == t, so at most one
    /// operation per key is in flight and reads can be checked exactly.
    owner: Option<(u64, u64)>,
}

impl Chooser {
    /// A chooser for a workload over `keys` keys.
    pub fn new(keys: u64, workload: Workload, zipf: Option<f64>, batch_size: u32) -> Chooser {
        Chooser { keys, workload, zipf: zipf.map(|t| Zipf::new(keys, t)), batch_size, owner: None }
    }

    /// Restricts this chooser to the keys of task `task` out of `tasks`.
    pub fn owned_by(mut self, task: u64, tasks: u64) -> Chooser {
        self.owner = Some((task, tasks));
        self
    }

    fn key(&self, rng: &mut Rng) -> u64 {
        let k = match &self.zipf {
            Some(z) => z.key(rng),
            None => rng.below(self.keys),
        };
        match self.owner {
            Some((task, tasks)) => {
                let owned = k - k % tasks + task;
                if owned < self.keys { owned } else { task.min(self.keys - 1) }
            }
            None => k,
        }
    }

    /// The operation with global sequence number `seq` (used by the insert workload).
    pub fn choose(&self, rng: &mut Rng, seq: u64) -> Op {
        let read_pct = match self.workload {
            Workload::Insert => return Op::Write { key: seq, replace: false },
            Workload::ReadUpdate { read_pct } | Workload::ReadReplace { read_pct } => read_pct,
        };
        if rng.below(100) < u64::from(read_pct) {
            Op::Read((0..self.batch_size).map(|_| self.key(rng)).collect())
        } else {
            Op::Write { key: self.key(rng), replace: matches!(self.workload, Workload::ReadReplace { .. }) }
        }
    }
}

fn fill(k: u64, version: u64, bin: usize, out: &mut [u8]) {
    let mut x = scramble(k ^ scramble(version) ^ (bin as u64).rotate_left(48)) | 1;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

/// Total value bytes of key `k` at `version`.
pub fn object_len(k: u64, version: u64, size: SizeRange) -> usize {
    if size.min == size.max {
        return size.min;
    }
    size.min + (scramble(k.wrapping_mul(31) ^ version) % (size.max - size.min + 1) as u64) as usize
}

/// Name of bin `i`.
pub fn bin_name(i: usize) -> BinName {
    let name = format!("b{i}");
    match BinName::new(name.as_bytes()) {
        Ok(n) => n,
        Err(_) => unreachable!("bin names b0..b999 are at most 4 bytes"),
    }
}

/// The bins of key `k` at `version`.
pub fn make_bins(k: u64, version: u64, size: SizeRange, bins: u16) -> Vec<Bin> {
    let total = object_len(k, version, size);
    let n = usize::from(bins);
    (0..n)
        .map(|i| {
            let len = total / n + usize::from(i < total % n);
            let mut bytes = vec![0u8; len];
            fill(k, version, i, &mut bytes);
            if i == 0 {
                bytes[..8].copy_from_slice(&version.to_le_bytes());
                bytes[8..16].copy_from_slice(&k.to_le_bytes());
            }
            Bin { name: bin_name(i), value: Value::Blob(bytes) }
        })
        .collect()
}

/// Checks bins read for key `k`; returns the version they hold, or what is wrong.
pub fn check_bins(k: u64, got: &[Bin], size: SizeRange, bins: u16) -> Result<u64, String> {
    let Some(Bin { value: Value::Blob(first), .. }) = got.first() else {
        return Err(format!("key {k}: bin 0 missing or not a blob"));
    };
    if first.len() < 16 {
        return Err(format!("key {k}: bin 0 too short ({} bytes)", first.len()));
    }
    let mut w = [0u8; 8];
    w.copy_from_slice(&first[..8]);
    let version = u64::from_le_bytes(w);
    w.copy_from_slice(&first[8..16]);
    let stored_key = u64::from_le_bytes(w);
    if stored_key != k {
        return Err(format!("key {k}: holds the value of key {stored_key}"));
    }
    if got != make_bins(k, version, size, bins).as_slice() {
        return Err(format!("key {k}: bytes differ from version {version}"));
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_check_out_and_mismatches_are_caught() {
        let size = SizeRange { min: 100, max: 3000 };
        let bins = make_bins(7, 42, size, 3);
        assert_eq!(check_bins(7, &bins, size, 3), Ok(42));
        assert!(check_bins(8, &bins, size, 3).unwrap_err().contains("value of key 7"));
        let mut bad = bins.clone();
        if let Value::Blob(b) = &mut bad[1].value {
            b[3] ^= 1;
        }
        assert!(check_bins(7, &bad, size, 3).is_err());
    }

    #[test]
    fn zipf_is_skewed_and_in_range() {
        let z = Zipf::new(10_000, 0.99);
        let mut rng = Rng::new(1);
        let mut hits = std::collections::HashMap::new();
        for _ in 0..100_000 {
            let k = z.key(&mut rng);
            assert!(k < 10_000);
            *hits.entry(k).or_insert(0u32) += 1;
        }
        let top = hits.values().max().copied().unwrap_or(0);
        assert!(top > 5_000, "hottest key got only {top} of 100000");
    }

    #[test]
    fn ownership_keeps_keys_apart() {
        let c = Chooser::new(1000, Workload::ReadUpdate { read_pct: 50 }, None, 1).owned_by(3, 8);
        let mut rng = Rng::new(5);
        for i in 0..10_000 {
            match c.choose(&mut rng, i) {
                Op::Read(keys) => assert!(keys.iter().all(|k| k % 8 == 3 && *k < 1000)),
                Op::Write { key, .. } => assert!(key % 8 == 3 && key < 1000),
            }
        }
    }
}
