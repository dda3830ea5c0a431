//! Concurrency: 8 threads of random puts, gets and deletes checked against a model, then a
//! restart and the same check; and read-modify-write atomicity on shared hot keys.

use std::collections::HashMap;
use std::sync::Mutex;

use peregrine_engine::{Applied, BinSelection, Change, Engine, Error, GenerationPolicy, Value, WritePolicy};

use crate::common::*;

const THREADS: i64 = 8;
const KEYS_PER_THREAD: i64 = 150;
const OPS_PER_THREAD: u64 = 3000;

#[test]
fn eight_threads_against_a_model_then_restart() {
    for backend in BACKENDS {
        let dir = test_dir();
        let cfg = config(dir.path(), backend, 64 << 20);
        let e = Engine::open(cfg.clone()).unwrap();
        let model: Mutex<HashMap<i64, Option<u64>>> = Mutex::new(HashMap::new());
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let e = &e;
                let model = &model;
                s.spawn(move || {
                    let mut rng = Rng(1 + t as u64);
                    let mut mine: HashMap<i64, Option<u64>> = HashMap::new();
                    for i in 0..OPS_PER_THREAD {
                        // Thread t owns keys t, t + 8, t + 16, ...: the model per key is exact.
                        let k = rng.below(KEYS_PER_THREAD as u64) as i64 * THREADS + t;
                        let len = 50 + (rng.below(2000) as usize);
                        match rng.below(10) {
                            0..=4 => {
                                e.put(&digest(k), b"s", None, bins(k, i, len), &WritePolicy::default()).unwrap();
                                mine.insert(k, Some(i * 10_000 + len as u64));
                            }
                            5 => {
                                let r = e.delete(&digest(k), GenerationPolicy::None);
                                match mine.get(&k).copied().flatten() {
                                    Some(_) => r.unwrap(),
                                    None => assert!(matches!(r, Err(Error::NotFound))),
                                }
                                mine.insert(k, None);
                            }
                            _ => {
                                let got = e.get(&digest(k), &BinSelection::All);
                                match mine.get(&k).copied().flatten() {
                                    Some(tag) => {
                                        let (v, len) = (tag / 10_000, (tag % 10_000) as usize);
                                        assert_eq!(got.unwrap().bins, bins(k, v, len));
                                    }
                                    None => assert!(matches!(got, Err(Error::NotFound))),
                                }
                            }
                        }
                    }
                    model.lock().unwrap().extend(mine);
                });
            }
        });
        let model = model.into_inner().unwrap();
        let check = |e: &Engine| {
            for (k, state) in &model {
                let got = e.get(&digest(*k), &BinSelection::All);
                match state {
                    Some(tag) => assert_eq!(got.unwrap().bins, bins(*k, tag / 10_000, (tag % 10_000) as usize)),
                    None => assert!(matches!(got, Err(Error::NotFound)), "{backend:?}: deleted key {k} is back"),
                }
            }
        };
        check(&e);
        let live = model.values().filter(|v| v.is_some()).count() as u64;
        assert_eq!(e.stats().records, live);
        e.close().unwrap();
        drop(e);
        let e = Engine::open(cfg).unwrap();
        check(&e);
        assert_eq!(e.stats().records, live);
        e.close().unwrap();
    }
}

/// Concurrent increments of a few hot keys through `modify_async` lose no update.
#[test]
fn read_modify_write_is_atomic_under_contention() {
    for backend in BACKENDS {
        let dir = test_dir();
        let e = Engine::open(config(dir.path(), backend, 32 << 20)).unwrap();
        let increments = 300;
        let busy = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..6 {
                let e = &e;
                let busy = &busy;
                s.spawn(move || {
                    let mut done = 0;
                    while done < increments {
                        let k = done % 3;
                        let r = peregrine_engine::completion::block_on(e.modify_async(&digest(k), true, |existing| {
                            let n = match existing.and_then(|x| x.record).and_then(|r| r.bin("n").cloned()) {
                                Some(Value::Int(n)) => n,
                                _ => 0,
                            };
                            Ok(Change::Put {
                                set_name: b"s".to_vec(),
                                key: None,
                                bins: vec![peregrine_engine::Bin::new("n", Value::Int(n + 1)).unwrap()],
                                void_time: 0,
                            })
                        }));
                        match r {
                            Ok(Applied::Written(_)) => done += 1,
                            Err(Error::KeyBusy) => {
                                busy.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                });
            }
        });
        let total: i64 = (0..3)
            .map(|k| match e.get(&digest(k), &BinSelection::All).unwrap().bin("n") {
                Some(Value::Int(n)) => *n,
                other => panic!("{other:?}"),
            })
            .sum();
        assert_eq!(total, 6 * increments, "{backend:?}: lost updates");
        e.close().unwrap();
    }
}
