"""Peregrine against the official Aerospike Python client (aerospike on PyPI, 19.x).

Run by server/tests/python_client.rs, which starts a `peregrine` process and calls
    python test_wire.py --port PORT --phase main        (then SIGTERM and a restart)
    python test_wire.py --port PORT --phase restart     (then SIGKILL and a restart)
    python test_wire.py --port PORT --phase after-kill
    python test_wire.py --port PORT --phase main --cluster 3    (a node of a 3-node cluster)
Every test is a function; the runner prints one line per test and exits 1 on any failure.
"""

import argparse
import random
import sys
import time
import traceback
import warnings

import aerospike
from aerospike import exception as ex
from aerospike_helpers.batch import records as br
from aerospike_helpers.operations import operations as op
from aerospike_helpers.operations import list_operations as lop
from aerospike_helpers import expressions as exp

warnings.simplefilter("ignore")  # the client warns that `meta` is deprecated; it still works

NS = "test"
DATASET = 10_000
DATASET_SET = "dataset"
# Deleted in the main phase (plain and durable deletes); checked after both restarts.
DELETED_IN_MAIN = [(NS, "del", 0), (NS, "del", 1), (NS, "del", "gen")]


def expect(exc_class, fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc_class as e:
        return e
    except Exception as e:  # noqa: BLE001
        raise AssertionError(f"expected {exc_class.__name__}, got {type(e).__name__}: {e}") from e
    raise AssertionError(f"expected {exc_class.__name__}, got success")


def dataset_value(i):
    rnd = random.Random(i)
    size = rnd.randint(1, 3000)
    return {
        "i": rnd.randint(-(2**63), 2**63 - 1),
        "b": bytes(rnd.getrandbits(8) for _ in range(size)),
        "s": "".join(chr(rnd.randint(32, 0x2FFF)) for _ in range(rnd.randint(0, 50))),
        "f": rnd.random() * 1e6,
    }


class Tests:
    def __init__(self, client):
        self.c = client

    # -- info -----------------------------------------------------------------------------
    def test_info_commands(self):
        c = self.c
        node = list(c.info_all("node").values())[0][1].strip()
        assert len(node) > 0 and int(node, 16) >= 0, node
        build = list(c.info_all("build").values())[0][1].strip()
        assert build.startswith("8."), build
        assert list(c.info_all("namespaces").values())[0][1].strip() == NS
        stats = list(c.info_all(f"namespace/{NS}").values())[0][1]
        assert "objects=" in stats and "device_total_bytes=" in stats and "stop_writes=false" in stats, stats
        assert f"cluster_size={CLUSTER}" in list(c.info_all("statistics").values())[0][1]
        assert list(c.info_all("partitions").values())[0][1].strip() == "4096"
        replicas = list(c.info_all("replicas").values())[0][1].strip()
        if CLUSTER == 1:
            assert replicas.startswith(f"{NS}:0,1,") and len(replicas.split(",")[-1]) == 684, replicas
        else:
            # Strong consistency: a non-zero regime, one bitmap per replica index.
            regime, count = replicas.split(":")[1].split(",")[:2]
            assert int(regime) >= 1 and int(count) == min(3, CLUSTER), replicas
            assert all(len(b) == 684 for b in replicas.split(",")[2:]), replicas
        # The client turns "ERROR:<code>:..." answers into exceptions with that code.
        assert expect(ex.AerospikeError, c.info_all, "no-such-command").code == 4
        assert expect(ex.AerospikeError, c.info_all, "namespace/nope").code == 20

    # -- bin types ------------------------------------------------------------------------
    def test_every_bin_type_round_trips(self):
        k = (NS, "types", "all")
        bins = {
            "int": -42,
            "bigint": 2**63 - 1,
            "float": 3.25,
            "str": "héllo wörld",
            "bytes": bytearray(b"\x00\xffbin"),
            "bool": True,
            "list": [1, "two", 3.0, [4], {"five": 5}],
            "map": {"a": 1, "b": [2, 3], "c": {"d": "e"}},
            "geo": aerospike.GeoJSON({"type": "Point", "coordinates": [1.5, 2.5]}),
        }
        self.c.put(k, bins)
        _, meta, got = self.c.get(k)
        assert meta["gen"] == 1
        for name, value in bins.items():
            if name == "geo":
                assert got["geo"].unwrap() == value.unwrap(), got["geo"]
            else:
                assert got[name] == value, (name, got[name], value)

    # -- reads ----------------------------------------------------------------------------
    def test_get_select_exists_header(self):
        k = (NS, "reads", 1)
        self.c.put(k, {"a": 1, "b": "two", "c": 3.0})
        _, _, bins = self.c.select(k, ["a", "c", "missing"])
        assert bins == {"a": 1, "c": 3.0}, bins
        _, meta = self.c.exists(k)
        assert meta["gen"] == 1
        _, meta = self.c.exists((NS, "reads", "absent"))
        assert meta is None
        e = expect(ex.RecordNotFound, self.c.get, (NS, "reads", "absent"))
        assert e.code == 2

    # -- write policies -------------------------------------------------------------------
    def test_put_policies(self):
        c = self.c
        k = (NS, "pol", "p1")
        create = {"exists": aerospike.POLICY_EXISTS_CREATE}
        c.put(k, {"a": 1}, policy=create)
        assert expect(ex.RecordExistsError, c.put, k, {"a": 2}, policy=create).code == 5
        missing = (NS, "pol", "missing")
        for pol in (aerospike.POLICY_EXISTS_UPDATE, aerospike.POLICY_EXISTS_REPLACE):
            assert expect(ex.RecordNotFound, c.put, missing, {"a": 1}, policy={"exists": pol}).code == 2
        c.put(k, {"b": 2}, policy={"exists": aerospike.POLICY_EXISTS_UPDATE})
        assert c.get(k)[2] == {"a": 1, "b": 2}
        c.put(k, {"c": 3}, policy={"exists": aerospike.POLICY_EXISTS_REPLACE})
        assert c.get(k)[2] == {"c": 3}
        c.put(k, {"d": 4}, policy={"exists": aerospike.POLICY_EXISTS_CREATE_OR_REPLACE})
        assert c.get(k)[2] == {"d": 4}
        c.put((NS, "pol", "p2"), {"x": 1}, policy={"exists": aerospike.POLICY_EXISTS_CREATE_OR_REPLACE})
        assert c.get((NS, "pol", "p2"))[2] == {"x": 1}

    def test_generation_policies(self):
        c = self.c
        k = (NS, "gen", 1)
        c.put(k, {"v": 1})
        c.put(k, {"v": 2})
        gen = c.get(k)[1]["gen"]
        assert gen == 2
        eq = {"gen": aerospike.POLICY_GEN_EQ}
        e = expect(ex.RecordGenerationError, c.put, k, {"v": 3}, meta={"gen": 1}, policy=eq)
        assert e.code == 3
        c.put(k, {"v": 3}, meta={"gen": 2}, policy=eq)
        gt = {"gen": aerospike.POLICY_GEN_GT}
        expect(ex.RecordGenerationError, c.put, k, {"v": 4}, meta={"gen": 3}, policy=gt)
        c.put(k, {"v": 4}, meta={"gen": 4}, policy=gt)
        assert c.get(k)[2] == {"v": 4} and c.get(k)[1]["gen"] == 4

    def test_ttl_round_trip(self):
        c = self.c
        k = (NS, "ttl", 1)
        c.put(k, {"v": 1}, meta={"ttl": 1000})
        ttl = c.get(k)[1]["ttl"]
        assert 995 <= ttl <= 1000, ttl
        c.put(k, {"v": 2}, meta={"ttl": aerospike.TTL_DONT_UPDATE})
        ttl2 = c.get(k)[1]["ttl"]
        assert 990 <= ttl2 <= 1000, ttl2
        c.put(k, {"v": 3}, meta={"ttl": aerospike.TTL_NEVER_EXPIRE})
        assert c.get(k)[1]["ttl"] == 4294967295
        c.touch(k, 500)
        _, meta, bins = c.get(k)
        assert 495 <= meta["ttl"] <= 500 and bins == {"v": 3} and meta["gen"] == 4, meta
        short = (NS, "ttl", "short")
        c.put(short, {"v": 1}, meta={"ttl": 1})
        time.sleep(2.2)
        expect(ex.RecordNotFound, c.get, short)
        expect(ex.RecordNotFound, c.touch, (NS, "ttl", "missing"), 10)

    def test_send_key_is_stored_and_returned(self):
        # A single-record read carries no key on the wire: the client hands back the key it was
        # given. The key in a scan row can only come from the server, so the check is there,
        # with rows matched by the digest the client computes.
        c = self.c
        set_name = "keys"
        sent = ["user-7", 42, bytearray(b"k\x00\xff")]
        for pk in sent:
            c.put((NS, set_name, pk), {"v": 1}, policy={"key": aerospike.POLICY_KEY_SEND})
        c.put((NS, set_name, "not-sent"), {"v": 2})  # default key policy: the digest only
        c.put((NS, set_name, "user-7"), {"v": 7})  # a rewrite without the key keeps the stored one
        rows = {bytes(r[0][3]): r for r in c.query(NS, set_name).results()}
        assert len(rows) == 4, rows
        for pk in sent:
            key = rows[bytes(aerospike.calc_digest(NS, set_name, pk))][0]
            assert key[2] == pk and type(key[2]) is type(pk), (pk, key)
        key = rows[bytes(aerospike.calc_digest(NS, set_name, "not-sent"))][0]
        assert key[2] is None, key
        # A key tuple holding only the digest reaches the same record.
        digest = aerospike.calc_digest(NS, set_name, "user-7")
        _, meta, bins = c.get((NS, set_name, None, digest))
        assert bins == {"v": 7} and meta["gen"] == 2, (meta, bins)

    # -- deletes --------------------------------------------------------------------------
    def test_delete_and_durable_delete(self):
        # The records stay deleted across a clean and an unclean restart: see check_deleted.
        c = self.c
        for i, pol in enumerate(({}, {"durable_delete": True})):
            k = (NS, "del", i)
            c.put(k, {"v": 1})
            c.put(k, {"v": 2})
            c.remove(k, policy=pol)
            expect(ex.RecordNotFound, c.get, k)
            assert expect(ex.RecordNotFound, c.remove, k).code == 2
        k = (NS, "del", "gen")
        c.put(k, {"v": 1})
        expect(ex.RecordGenerationError, c.remove, k, meta={"gen": 5}, policy={"gen": aerospike.POLICY_GEN_EQ})
        c.remove(k, meta={"gen": 1}, policy={"gen": aerospike.POLICY_GEN_EQ})
        check_deleted(c)

    def test_remove_bin_and_empty_record(self):
        c = self.c
        k = (NS, "rb", 1)
        c.put(k, {"a": 1, "b": 2})
        c.remove_bin(k, ["a"])
        assert c.get(k)[2] == {"b": 2}
        c.remove_bin(k, ["b"])
        expect(ex.RecordNotFound, c.get, k)

    # -- operate --------------------------------------------------------------------------
    def test_operate_and_single_bin_ops(self):
        c = self.c
        k = (NS, "ops", 1)
        c.put(k, {"n": 1, "f": 1.5, "s": "mid", "b": bytearray(b"m")})
        c.increment(k, "n", 5)
        c.increment(k, "f", 0.25)
        c.append(k, "s", "-end")
        c.prepend(k, "s", "start-")
        c.append(k, "b", bytearray(b"z"))
        _, _, bins = c.get(k)
        assert bins["n"] == 6 and bins["f"] == 1.75 and bins["s"] == "start-mid-end" and bins["b"] == b"mz", bins
        _, meta, got = c.operate(k, [op.increment("n", 10), op.read("n"), op.write("w", "x"), op.read("w"), op.touch(300)])
        assert got == {"n": 16, "w": "x"}, got
        assert 295 <= meta["ttl"] <= 300, meta
        e = expect(ex.BinIncompatibleType, c.increment, k, "s", 1)
        assert e.code == 12
        expect(ex.BinIncompatibleType, c.append, k, "n", "x")
        c.increment((NS, "ops", "new"), "n", 3)
        assert c.get((NS, "ops", "new"))[2] == {"n": 3}
        c.operate(k, [op.delete()])
        expect(ex.RecordNotFound, c.get, k)

    def test_bin_name_limit(self):
        e = expect(ex.BinNameError, self.c.put, (NS, "bn", 1), {"x" * 16: 1})
        assert e.code == 21
        self.c.put((NS, "bn", 2), {"x" * 15: 1})

    # -- batch ----------------------------------------------------------------------------
    def test_batch_reads_with_missing_keys(self):
        c = self.c
        keys = [(NS, "batch", i) for i in range(50)]
        for k in keys[::2]:
            c.put(k, {"v": k[2], "w": "x"})
        res = c.batch_read(keys)
        assert len(res.batch_records) == 50
        for r in res.batch_records:
            i = r.key[2]
            if i % 2 == 0:
                assert r.result == 0 and r.record[2] == {"v": i, "w": "x"}, r.record
            else:
                assert r.result == 2 and r.record is None
        res = c.batch_read(keys[:4], bins=["v"])
        assert res.batch_records[0].record[2] == {"v": 0}

    def test_batch_writes_and_deletes(self):
        c = self.c
        keys = [(NS, "bw", i) for i in range(20)]
        recs = br.BatchRecords([br.Write(k, [op.write("v", k[2]), op.increment("n", 1)]) for k in keys])
        c.batch_write(recs)
        assert all(r.result == 0 for r in recs.batch_records)
        assert c.get(keys[7])[2] == {"v": 7, "n": 1}
        c.batch_operate(keys, [op.increment("n", 10)])
        assert c.get(keys[7])[2]["n"] == 11
        c.batch_remove(keys[:10])
        expect(ex.RecordNotFound, c.get, keys[3])
        assert c.get(keys[13])[2]["v"] == 13

    # -- scans and queries ----------------------------------------------------------------
    def test_scan_counts_selects_and_paginates(self):
        c = self.c
        set_name = "scan"
        for i in range(300):
            c.put((NS, set_name, i), {"a": i, "b": "x" * 10})
        rows = c.query(NS, set_name).results()
        assert len(rows) == 300, len(rows)
        assert sorted(r[2]["a"] for r in rows) == list(range(300))
        q = c.query(NS, set_name)
        q.select("a")
        rows = q.results()
        assert len(rows) == 300 and all(set(r[2]) == {"a"} for r in rows)
        rows = c.query(NS, set_name).results(options={"nobins": True})
        assert len(rows) == 300 and all(r[2] == {} for r in rows)
        seen = []
        c.query(NS, set_name).foreach(lambda r: seen.append(r[2]["a"]))
        assert len(seen) == 300
        q = c.query(NS, set_name)
        q.max_records = 70
        q.paginate()
        pages, total = 0, 0
        while not q.is_done():
            page = q.results()
            total += len(page)
            pages += 1
            assert pages < 20
        assert total == 300, (total, pages)
        assert len(c.query(NS, "no-such-set").results()) == 0

    # -- errors and unsupported features --------------------------------------------------
    def test_errors(self):
        c = self.c
        k = (NS, "err", 1)
        c.put(k, {"a": 1})
        assert expect(ex.RecordTooBig, c.put, (NS, "err", "big"), {"b": b"x" * (2 << 20)}).code == 13
        expect(ex.RecordNotFound, c.get, (NS, "err", "big"))
        assert expect(ex.NamespaceNotFound, c.put, ("nope", "s", 1), {"a": 1}).code == 20
        assert expect(ex.UnsupportedFeature, c.apply, k, "mod", "fn", []).code == 16
        assert expect(ex.UnsupportedFeature, c.operate, k, [lop.list_append("l", 1)]).code == 16
        pol = {"expressions": exp.Eq(exp.IntBin("a"), 1).compile()}
        assert expect(ex.UnsupportedFeature, c.get, k, policy=pol).code == 16
        assert c.get(k)[2] == {"a": 1}

    def test_compressed_requests(self):
        c2 = aerospike.client({"hosts": [HOST], "policies": {"write": {"compress": True}, "read": {"compress": True}}}).connect()
        try:
            k = (NS, "zip", 1)
            value = "compressible " * 2000
            c2.put(k, {"v": value}, policy={"compress": True})
            assert c2.get(k, policy={"compress": True})[2]["v"] == value
        finally:
            c2.close()

    # -- the dataset kept across the restart ----------------------------------------------
    def test_ten_thousand_random_records(self):
        c = self.c
        for i in range(DATASET):
            c.put((NS, DATASET_SET, i), dataset_value(i), policy={"key": aerospike.POLICY_KEY_SEND})
        for i in random.Random(5).sample(range(DATASET), 2000):
            assert c.get((NS, DATASET_SET, i))[2] == dataset_value(i), i
        for i in range(0, DATASET, 100):
            c.remove((NS, DATASET_SET, i))
        count = sum(1 for _ in c.query(NS, DATASET_SET).results(options={"nobins": True}))
        assert count == DATASET - DATASET // 100, count


def check_deleted(c):
    """The records test_delete_and_durable_delete deleted are gone: by key and from scans."""
    for k in DELETED_IN_MAIN:
        expect(ex.RecordNotFound, c.get, k)
        assert c.exists(k)[1] is None, k
    rows = c.query(NS, "del").results()
    assert rows == [], rows


def verify_after_restart(c, deleted):
    """The dataset written before the restart, byte for byte; deleted records stay deleted
    (`deleted(i)` says whether dataset record i was deleted)."""
    for i in range(DATASET):
        k = (NS, DATASET_SET, i)
        if deleted(i):
            expect(ex.RecordNotFound, c.get, k)
        else:
            key, meta, bins = c.get(k, policy={"key": aerospike.POLICY_KEY_SEND})
            assert bins == dataset_value(i), i
    rows = c.query(NS, DATASET_SET).results()
    assert len(rows) == sum(1 for i in range(DATASET) if not deleted(i)), len(rows)
    assert all(r[0][2] is not None for r in rows), "stored keys lost"
    assert sorted(r[0][2] for r in rows) == [i for i in range(DATASET) if not deleted(i)]
    assert c.get((NS, "types", "all"))[2]["str"] == "héllo wörld"
    check_deleted(c)


def deleted_in_main(i):
    return i % 100 == 0


def deleted_after_restart(i):
    return i % 100 in (0, 50)


def phase_restart(c):
    """After the clean restart: everything is there; then more deletes (plain and durable),
    given time to reach the device before the node is killed."""
    verify_after_restart(c, deleted_in_main)
    for n, i in enumerate(range(50, DATASET, 100)):
        c.remove((NS, DATASET_SET, i), policy={"durable_delete": True} if n % 2 else {})
    # The tombstones reach the device within flush_interval_ms (1 s).
    time.sleep(3)


HOST = ("127.0.0.1", 3000)
CLUSTER = 1  # nodes in the cluster under test


def main():
    global HOST, CLUSTER
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--phase", choices=["main", "restart", "after-kill"], required=True)
    p.add_argument("--cluster", type=int, default=1, help="nodes in the cluster (1: a node alone)")
    args = p.parse_args()
    CLUSTER = args.cluster
    HOST = ("127.0.0.1", args.port)
    config = {"hosts": [HOST]}
    if CLUSTER > 1:
        # The test cluster runs 3 nodes of 4096 Raft groups each on a 2-core machine, and the
        # first seconds after it is ready are CPU-bound (every group awake until it hibernates):
        # a command can take longer than the client's default 1 s total timeout then.
        config["policies"] = {
            kind: {"total_timeout": 5000}
            for kind in ("read", "write", "operate", "remove", "apply", "batch", "scan", "query")
        }
    client = aerospike.client(config).connect()
    failures = 0
    if args.phase == "main":
        tests = Tests(client)
        names = [n for n in dir(tests) if n.startswith("test_")]
        for name in names:
            started = time.time()
            try:
                getattr(tests, name)()
                print(f"PASS {name} ({time.time() - started:.2f}s)", flush=True)
            except Exception:  # noqa: BLE001
                failures += 1
                print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
        print(f"{len(names) - failures} passed, {failures} failed", flush=True)
    else:
        check = {
            "restart": phase_restart,
            "after-kill": lambda c: verify_after_restart(c, deleted_after_restart),
        }[args.phase]
        try:
            check(client)
            print(f"PASS {args.phase}", flush=True)
        except Exception:  # noqa: BLE001
            failures += 1
            print(f"FAIL {args.phase}\n{traceback.format_exc()}", flush=True)
    client.close()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
