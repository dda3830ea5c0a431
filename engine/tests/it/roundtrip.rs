//! Round trips of every bin type and every write policy, on both backends.

use std::sync::Arc;

use peregrine_engine::clock::{CITRUSLEAF_EPOCH_UNIX_S, Clock, ManualClock};
use peregrine_engine::record::particle;
use peregrine_engine::{
    Bin, BinName, BinSelection, Engine, Error, GenerationPolicy, RecordExists, Ttl, Value, WritePolicy,
};

use crate::common::*;

fn put(
    e: &Engine,
    k: i64,
    bins: Vec<Bin>,
    policy: WritePolicy,
) -> peregrine_engine::Result<peregrine_engine::RecordMeta> {
    e.put(&digest(k), b"s", Some(key(k)), bins, &policy)
}

fn policy(exists: RecordExists) -> WritePolicy {
    WritePolicy { exists, ..WritePolicy::default() }
}

#[test]
fn every_bin_type_round_trips() {
    for backend in BACKENDS {
        let dir = test_dir();
        let e = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap();
        let all = vec![
            Bin::new("int", Value::Int(-7)).unwrap(),
            Bin::new("float", Value::Float(2.5)).unwrap(),
            Bin::new("bool", Value::Bool(true)).unwrap(),
            Bin::new("str", Value::String("héllo".as_bytes().to_vec())).unwrap(),
            Bin::new("blob", Value::Blob(vec![0, 1, 2, 255])).unwrap(),
            Bin::new("list", Value::List(vec![0x93, 1, 2, 3])).unwrap(),
            Bin::new("map", Value::Map(vec![0x81, 0xa2, 3, b'k', 1])).unwrap(),
            Bin::new("geo", Value::Other { particle_type: particle::GEOJSON, bytes: b"{\"type\":\"Point\"}".to_vec() })
                .unwrap(),
            Bin::new("fifteen_chars__", Value::Int(15)).unwrap(),
        ];
        let meta = put(&e, 1, all.clone(), WritePolicy::default()).unwrap();
        assert_eq!(meta.generation, 1);
        let r = e.get(&digest(1), &BinSelection::All).unwrap();
        assert_eq!(r.bins, all, "{backend:?}");
        assert_eq!(r.key, Some(key(1)));
        assert_eq!(r.set_name, b"s");
        assert_eq!(r.meta, meta);
        let only = BinSelection::Only(vec![BinName::new(b"str").unwrap(), BinName::new(b"missing").unwrap()]);
        let r = e.get(&digest(1), &only).unwrap();
        assert_eq!(r.bins, vec![all[3].clone()]);
        let header = e.get(&digest(1), &BinSelection::None).unwrap();
        assert!(header.bins.is_empty());
        assert_eq!(header.meta.generation, 1);
        assert_eq!(e.exists(&digest(1)).unwrap(), Some(meta));
        assert_eq!(e.exists(&digest(2)).unwrap(), None);
        assert!(matches!(e.get(&digest(2), &BinSelection::All), Err(Error::NotFound)));
        e.close().unwrap();
    }
}

#[test]
fn existence_policies() {
    for backend in BACKENDS {
        let dir = test_dir();
        let e = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap();
        let a = || vec![Bin::new("a", Value::Int(1)).unwrap()];
        let b = || vec![Bin::new("b", Value::Int(2)).unwrap()];
        assert!(matches!(put(&e, 1, a(), policy(RecordExists::UpdateOnly)), Err(Error::NotFound)));
        assert!(matches!(put(&e, 1, a(), policy(RecordExists::ReplaceOnly)), Err(Error::NotFound)));
        assert_eq!(put(&e, 1, a(), policy(RecordExists::CreateOnly)).unwrap().generation, 1);
        assert!(matches!(put(&e, 1, a(), policy(RecordExists::CreateOnly)), Err(Error::RecordExists)));
        // Update merges.
        assert_eq!(put(&e, 1, b(), policy(RecordExists::Update)).unwrap().generation, 2);
        let names: Vec<_> = e.get(&digest(1), &BinSelection::All).unwrap().bins.iter().map(|b| b.name).collect();
        assert_eq!(names, vec![BinName::new(b"a").unwrap(), BinName::new(b"b").unwrap()]);
        // Update-only merges too, and overwrites same-named bins.
        put(&e, 1, vec![Bin::new("a", Value::Int(10)).unwrap()], policy(RecordExists::UpdateOnly)).unwrap();
        assert_eq!(e.get(&digest(1), &BinSelection::All).unwrap().bin("a"), Some(&Value::Int(10)));
        // Replace drops the other bins.
        assert_eq!(put(&e, 1, b(), policy(RecordExists::Replace)).unwrap().generation, 4);
        assert_eq!(e.get(&digest(1), &BinSelection::All).unwrap().bins, b());
        put(&e, 1, a(), policy(RecordExists::ReplaceOnly)).unwrap();
        assert_eq!(e.get(&digest(1), &BinSelection::All).unwrap().bins, a());
        // Replace creates.
        assert_eq!(put(&e, 2, a(), policy(RecordExists::Replace)).unwrap().generation, 1);
        e.close().unwrap();
    }
}

#[test]
fn generation_policies() {
    for backend in BACKENDS {
        let dir = test_dir();
        let e = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap();
        let v = |x| vec![Bin::new("v", Value::Int(x)).unwrap()];
        let gen_eq = |g| WritePolicy { generation: GenerationPolicy::Equal(g), ..WritePolicy::default() };
        let gen_gt = |g| WritePolicy { generation: GenerationPolicy::Greater(g), ..WritePolicy::default() };
        // No record: the condition does not apply.
        assert_eq!(put(&e, 1, v(1), gen_eq(9)).unwrap().generation, 1);
        match put(&e, 1, v(2), gen_eq(2)) {
            Err(Error::Generation { required: 2, actual: 1 }) => {}
            other => panic!("expected a generation error, got {other:?}"),
        }
        assert_eq!(put(&e, 1, v(2), gen_eq(1)).unwrap().generation, 2);
        assert!(matches!(put(&e, 1, v(3), gen_gt(2)), Err(Error::Generation { .. })));
        assert_eq!(put(&e, 1, v(3), gen_gt(3)).unwrap().generation, 3);
        assert!(matches!(e.delete(&digest(1), GenerationPolicy::Equal(1)), Err(Error::Generation { .. })));
        e.delete(&digest(1), GenerationPolicy::Equal(3)).unwrap();
        assert!(matches!(e.delete(&digest(1), GenerationPolicy::None), Err(Error::NotFound)));
        // Re-created after a delete: generation starts again at 1.
        assert_eq!(put(&e, 1, v(4), WritePolicy::default()).unwrap().generation, 1);
        e.close().unwrap();
    }
}

#[test]
fn ttl_and_expiry() {
    for backend in BACKENDS {
        let dir = test_dir();
        let start_ms = (CITRUSLEAF_EPOCH_UNIX_S + 1_000_000) * 1000;
        let clock = Arc::new(ManualClock::new(start_ms));
        let mut cfg = config_with_clock(dir.path(), backend, 16 << 20, clock.clone());
        cfg.default_ttl_s = 100;
        let e = Engine::open(cfg).unwrap();
        let now = clock.now_void_s();
        let with_ttl = |ttl| WritePolicy { ttl, ..WritePolicy::default() };
        assert_eq!(put(&e, 1, bins(1, 0, 10), with_ttl(Ttl::NamespaceDefault)).unwrap().void_time, now + 100);
        assert_eq!(put(&e, 2, bins(2, 0, 10), with_ttl(Ttl::Never)).unwrap().void_time, 0);
        assert_eq!(put(&e, 3, bins(3, 0, 10), with_ttl(Ttl::Seconds(10))).unwrap().void_time, now + 10);
        assert_eq!(put(&e, 3, bins(3, 1, 10), with_ttl(Ttl::Keep)).unwrap().void_time, now + 10);
        assert!(matches!(put(&e, 4, bins(4, 0, 10), with_ttl(Ttl::Seconds(u32::MAX))), Err(Error::Parameter(_))));
        // Touch extends the life and bumps the generation.
        let touched = e.touch(&digest(3), Ttl::Seconds(20), GenerationPolicy::None).unwrap();
        assert_eq!(touched.void_time, now + 20);
        assert_eq!(touched.generation, 3);
        assert!(matches!(e.touch(&digest(99), Ttl::Never, GenerationPolicy::None), Err(Error::NotFound)));
        clock.advance_ms(20_000);
        assert!(matches!(e.get(&digest(3), &BinSelection::All), Err(Error::NotFound)), "expired record readable");
        assert_eq!(e.exists(&digest(3)).unwrap(), None);
        assert!(e.get(&digest(1), &BinSelection::All).is_ok());
        // Writing over an expired record creates a new one.
        assert_eq!(put(&e, 3, bins(3, 2, 10), WritePolicy::default()).unwrap().generation, 1);
        clock.advance_ms(100_000);
        assert!(matches!(e.get(&digest(1), &BinSelection::All), Err(Error::NotFound)));
        assert!(e.get(&digest(2), &BinSelection::All).is_ok(), "a record without TTL expired");
        e.close().unwrap();
    }
}

#[test]
fn limits_give_clear_errors() {
    for backend in BACKENDS {
        let dir = test_dir();
        let e = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap();
        let big = vec![Bin::new("v", Value::Blob(vec![7; 70 * 1024])).unwrap()];
        match put(&e, 1, big, WritePolicy::default()) {
            Err(Error::RecordTooBig { size, max }) => assert!(size > max && max == 64 * 1024),
            other => panic!("expected record too big, got {other:?}"),
        }
        assert!(e.get(&digest(1), &BinSelection::All).is_err(), "a refused record was stored");
        assert!(matches!(Bin::new("sixteen_chars___", Value::Int(1)), Err(Error::BinName { len: 16 })));
        let long_set = vec![b's'; 64];
        assert!(matches!(
            e.put(&digest(2), &long_set, None, bins(2, 0, 1), &WritePolicy::default()),
            Err(Error::SetName { .. })
        ));
        // No bins on a missing record stores nothing.
        assert_eq!(put(&e, 3, vec![], WritePolicy::default()).unwrap().generation, 0);
        assert_eq!(e.exists(&digest(3)).unwrap(), None);
        e.close().unwrap();
        assert!(matches!(e.get(&digest(1), &BinSelection::All), Err(Error::Shutdown)));
    }
}

#[test]
fn overwrites_and_deletes_survive_restart() {
    for backend in BACKENDS {
        let dir = test_dir();
        {
            let e = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap();
            for v in 0..5u64 {
                for k in 0..300 {
                    put(&e, k, bins(k, v, 200), WritePolicy::default()).unwrap();
                }
            }
            for k in (0..300).step_by(3) {
                e.delete(&digest(k), GenerationPolicy::None).unwrap();
            }
            let stats = e.stats();
            assert_eq!(stats.records, 200);
            assert_eq!(stats.tombstones, 100);
            e.close().unwrap();
        }
        let e = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap();
        assert!(e.recovery_report()[0].damaged.is_empty());
        for k in 0..300 {
            let got = e.get(&digest(k), &BinSelection::All);
            if k % 3 == 0 {
                assert!(matches!(got, Err(Error::NotFound)), "{backend:?}: deleted key {k} came back");
            } else {
                let r = got.unwrap();
                assert_eq!(r.bins, bins(k, 4, 200), "{backend:?}: key {k} lost its latest value");
                assert_eq!(r.meta.generation, 5);
            }
        }
        let stats = e.stats();
        assert_eq!((stats.records, stats.tombstones), (200, 100));
        e.close().unwrap();
    }
}

#[test]
fn partitions_list_in_digest_order() {
    for backend in BACKENDS {
        let dir = test_dir();
        let e = Engine::open(config(dir.path(), backend, 16 << 20)).unwrap();
        for k in 0..3000 {
            put(&e, k, bins(k, 0, 20), WritePolicy::default()).unwrap();
        }
        e.delete(&digest(0), GenerationPolicy::None).unwrap();
        let mut total = 0;
        for pid in peregrine_engine::PartitionId::all() {
            let entries = e.partition_entries(pid, None);
            assert!(entries.windows(2).all(|w| w[0].digest < w[1].digest));
            assert!(entries.iter().all(|x| x.digest.partition() == pid));
            if let Some(first) = entries.first() {
                let rest = e.partition_entries(pid, Some(&first.digest));
                assert_eq!(rest.len(), entries.len() - 1);
            }
            total += entries.len();
        }
        assert_eq!(total, 2999);
        let pid = digest(5).partition();
        let versions = peregrine_engine::completion::block_on(e.partition_versions_async(pid)).unwrap();
        assert!(versions.iter().any(|v| *v.digest() == digest(5)));
        e.close().unwrap();
    }
}
