"""Checks of a Peregrine cluster through the official Aerospike Python client.

    python cluster_checks.py --hosts H:P,H:P,H:P modes
        writes 300 records, reads each in every strong-consistency read mode, scans them
    python cluster_checks.py --hosts ... workload --seconds S --out FILE [--strict]
        writes new keys (and reads them back) for S seconds; records every acknowledged write
        and every error with its second, in FILE (JSON); --strict exits 1 on any error
    python cluster_checks.py --hosts ... verify --in FILE
        every acknowledged write of FILE reads back with its value (linearizable reads)
"""

import argparse
import json
import sys
import time

import aerospike
from aerospike import exception as ex

NS, SET = "test", "cluster"


def connect(hosts):
    return aerospike.client({
        "hosts": hosts,
        "policies": {
            "read": {"read_mode_sc": aerospike.POLICY_READ_MODE_SC_SESSION, "total_timeout": 3000, "max_retries": 3},
            "write": {"total_timeout": 3000, "max_retries": 0},
        },
    }).connect()


def modes(c):
    for i in range(300):
        c.put((NS, SET, f"m{i}"), {"v": i, "s": "x" * (i % 50)})
    for mode in (aerospike.POLICY_READ_MODE_SC_SESSION, aerospike.POLICY_READ_MODE_SC_LINEARIZE,
                 aerospike.POLICY_READ_MODE_SC_ALLOW_REPLICA, aerospike.POLICY_READ_MODE_SC_ALLOW_UNAVAILABLE):
        for i in range(300):
            _, meta, bins = c.get((NS, SET, f"m{i}"), policy={"read_mode_sc": mode})
            assert bins == {"v": i, "s": "x" * (i % 50)}, (mode, i, bins)
            assert meta["gen"] == 1, (mode, i, meta)
    seen = {}
    for _, _, bins in c.scan(NS, SET).results():
        seen[bins["v"]] = bins
    assert sorted(seen) == list(range(300)), sorted(seen)[:10]
    # Generation check-and-set through the leader: exactly one of two writers wins.
    key = (NS, SET, "cas")
    c.put(key, {"n": 0})
    _, meta, _ = c.get(key)
    wins = 0
    for _ in range(2):
        try:
            c.put(key, {"n": 1}, meta={"gen": meta["gen"]},
                  policy={"gen": aerospike.POLICY_GEN_EQ})
            wins += 1
        except ex.RecordGenerationError:
            pass
    assert wins == 1, wins
    print("PASS modes", flush=True)


def partition_of(key):
    d = aerospike.calc_digest(NS, SET, key)
    return (d[0] | d[1] << 8) & 0xFFF


def workload(c, seconds, out, strict, partitions):
    started = time.time()
    acked, errors, in_doubt = {}, [], []
    i, n = 0, 0
    while time.time() - started < seconds:
        n += 1
        key = f"w{n}"
        if partitions and partition_of(key) >= partitions:
            continue
        t = time.time() - started
        try:
            c.put((NS, SET, key), {"v": i})
            acked[key] = i
        except ex.AerospikeError as e:
            errors.append([round(t, 3), e.code, str(e.msg)])
            if getattr(e, "in_doubt", False) or e.code in (9, -1, -10):
                in_doubt.append(key)
        try:
            if key in acked:
                _, _, bins = c.get((NS, SET, key))
                if bins.get("v") != i:
                    errors.append([round(time.time() - started, 3), "wrong", f"{key}: {bins}"])
        except ex.AerospikeError as e:
            errors.append([round(time.time() - started, 3), e.code, "read: " + str(e.msg)])
        i += 1
    with open(out, "w") as f:
        json.dump({"acked": acked, "errors": errors, "in_doubt": in_doubt, "writes": i}, f)
    print(f"workload: {i} writes, {len(acked)} acknowledged, {len(errors)} errors", flush=True)
    if strict and errors:
        print("errors:", errors[:20], flush=True)
        sys.exit(1)


def verify(c, path):
    with open(path) as f:
        data = json.load(f)
    missing = []
    for key, v in data["acked"].items():
        try:
            _, _, bins = c.get((NS, SET, key), policy={"read_mode_sc": aerospike.POLICY_READ_MODE_SC_LINEARIZE})
            if bins.get("v") != v:
                missing.append((key, v, bins))
        except ex.RecordNotFound:
            missing.append((key, v, None))
    assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
    print(f"PASS verify: {len(data['acked'])} acknowledged writes read back", flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hosts", required=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("modes")
    w = sub.add_parser("workload")
    w.add_argument("--seconds", type=float, required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--strict", action="store_true")
    w.add_argument("--partitions", type=int, default=0, help="only keys of partitions below this (0: all)")
    v = sub.add_parser("verify")
    v.add_argument("--in", dest="path", required=True)
    args = p.parse_args()
    hosts = [(h.split(":")[0], int(h.split(":")[1])) for h in args.hosts.split(",")]
    c = connect(hosts)
    if args.cmd == "modes":
        modes(c)
    elif args.cmd == "workload":
        workload(c, args.seconds, args.out, args.strict, args.partitions)
    else:
        verify(c, args.path)
    c.close()


if __name__ == "__main__":
    main()
