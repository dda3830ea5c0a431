//! Tests of the client: the info parsers, the partition-table merge (regimes, claims that stop),
//! routing, and the client against fake nodes on the loopback whose answers the tests change
//! (partition moves, new and dead peers, a node not ready, retries on 11, refused connections
//! and timeouts).

use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use super::cluster::{
    BITMAP_B64_CHARS, BITMAP_BYTES, Merged, NamespaceReplicas, PartitionTable, Peer, parse_peers, parse_replicas,
};
use super::*;
use crate::info::put_answer;

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let byte = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let n = (byte(0) << 16) | (byte(1) << 8) | byte(2);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A 4096-bit bitmap with the partitions `owned` says.
fn bitmap(owned: impl Fn(usize) -> bool) -> Vec<u8> {
    let mut b = vec![0u8; BITMAP_BYTES];
    for p in 0..peregrine_index::PARTITION_COUNT {
        if owned(p) {
            b[p >> 3] |= 0x80 >> (p & 7);
        }
    }
    b
}

fn all() -> String {
    b64(&bitmap(|_| true))
}

fn none() -> String {
    b64(&bitmap(|_| false))
}

#[test]
fn base64_and_bitmap_sizes() {
    assert_eq!(base64_decode("TWFu").unwrap(), b"Man");
    assert_eq!(base64_decode("TWE=").unwrap(), b"Ma");
    assert_eq!(base64_decode("TQ==").unwrap(), b"M");
    assert_eq!(BITMAP_B64_CHARS, 684);
    assert_eq!(all().len(), 684);
    assert_eq!(all(), format!("{}//8=", "////".repeat(170)));
    assert_eq!(base64_decode(&all()).unwrap(), vec![0xFF; 512]);
}

#[test]
fn replicas_answers_parse() {
    let even = b64(&bitmap(|p| p % 2 == 0));
    let odd = b64(&bitmap(|p| p % 2 == 1));
    let answer = format!("test:0,1,{};sc:7,2,{even},{odd};", all());
    let parsed = parse_replicas(&answer).unwrap();
    assert_eq!(parsed.len(), 2);
    assert_eq!(parsed[0], NamespaceReplicas { namespace: "test".into(), regime: 0, bitmaps: vec![vec![0xFF; 512]] });
    assert_eq!(parsed[1].namespace, "sc");
    assert_eq!(parsed[1].regime, 7);
    assert_eq!(parsed[1].bitmaps.len(), 2);
    assert!(cluster::bit(&parsed[1].bitmaps[0], 0) && !cluster::bit(&parsed[1].bitmaps[0], 1));
    assert!(!cluster::bit(&parsed[1].bitmaps[1], 4094) && cluster::bit(&parsed[1].bitmaps[1], 4095));
    assert_eq!(parse_replicas("").unwrap(), Vec::new());
}

#[test]
fn malformed_replicas_answers_are_errors() {
    let full = all();
    let bad_char = format!("!{}", &full[1..]);
    let cases = [
        "ERROR:4:unrecognized command".to_string(),
        "test".to_string(),
        format!(":0,1,{full}"),
        format!("test:x,1,{full}"),
        format!("test:-1,1,{full}"),
        format!("test:0,0,{full}"),
        format!("test:0,17,{full}"),
        format!("test:0,2,{full}"),
        format!("test:0,1,{full},{full}"),
        "test:0,1,AAAA".to_string(),
        format!("test:0,1,{bad_char}"),
        format!("test:0,1,{full}x"),
        format!("test:0,1,{full};other"),
    ];
    for case in &cases {
        assert!(matches!(parse_replicas(case), Err(ClientError::Protocol(_))), "{case:?} parsed");
    }
    // Every truncation of a valid answer is an answer or an error, never a panic.
    let valid = format!("test:3,2,{full},{};b:0,1,{full}", none());
    for end in 0..valid.len() {
        let _ = parse_replicas(&valid[..end]);
    }
    assert_eq!(parse_replicas(&valid).unwrap().len(), 2);
}

#[test]
fn peers_answers_parse() {
    let p = parse_peers("1,3000,[]").unwrap();
    assert_eq!((p.generation, p.peers.len()), (1, 0));
    let p = parse_peers("3,3000,[[BB9,,[10.0.0.2:3001]],[BB8,,[10.0.0.3]]]").unwrap();
    assert_eq!(p.generation, 3);
    assert_eq!(
        p.peers,
        vec![
            Peer { name: "BB9".into(), tls_name: String::new(), addrs: vec!["10.0.0.2:3001".into()] },
            Peer { name: "BB8".into(), tls_name: String::new(), addrs: vec!["10.0.0.3:3000".into()] },
        ]
    );
    let p = parse_peers("7,3100,[[BB7,tls.example,[[::1]:3200,[fe80::1],::2,db-1.example,10.0.0.4:3000]],[BB6,,[]]]")
        .unwrap();
    assert_eq!(p.peers[0].tls_name, "tls.example");
    assert_eq!(p.peers[0].addrs, ["[::1]:3200", "[fe80::1]:3100", "[::2]:3100", "db-1.example:3100", "10.0.0.4:3000"]);
    assert!(p.peers[1].addrs.is_empty());
}

#[test]
fn malformed_peers_answers_are_errors() {
    let cases = [
        "",
        "ERROR:4:unrecognized command",
        "x,3000,[]",
        "1,port,[]",
        "1,3000",
        "1,3000,",
        "1,3000,[",
        "1,3000,[[A,,[h:1]]",
        "1,3000,[[A,,[h:99999]]]",
        "1,3000,[[A,,[h:]]]",
        "1,3000,[[,,[h]]]",
        "1,3000,[[A,,[]]]x",
        "1,3000,[[A,[h]]]",
        "1,3000,[[A,,[[]]]]",
        "1,3000,[[A,,[,]]]",
    ];
    for case in cases {
        assert!(matches!(parse_peers(case), Err(ClientError::Protocol(_))), "{case:?} parsed");
    }
    let valid = "12,3000,[[BB9,x,[10.0.0.2:3001,[::1]]],[BB8,,[10.0.0.3]]]";
    for end in 0..valid.len() {
        let _ = parse_peers(&valid[..end]);
    }
    assert_eq!(parse_peers(valid).unwrap().peers.len(), 2);
}

fn node(name: &str) -> Arc<Node> {
    Arc::new(Node::new(name.into(), "127.0.0.1:9".parse().unwrap()))
}

fn claims(regime: u32, bitmaps: Vec<Vec<u8>>) -> NamespaceReplicas {
    NamespaceReplicas { namespace: "test".into(), regime, bitmaps }
}

fn is(slot: Option<&Arc<Node>>, node: &Arc<Node>) -> bool {
    slot.is_some_and(|n| Arc::ptr_eq(n, node))
}

#[test]
fn merge_keeps_the_highest_regime_per_partition() {
    let (a, b) = (node("A"), node("B"));
    let full = bitmap(|_| true);
    let low = bitmap(|p| p < 2048);
    let mut t = PartitionTable::new(true);
    assert_eq!(t.merge(&a, &claims(5, vec![full.clone()])), Merged { changed: 4096, refused: 0 });
    // A node still on an older regime (it missed a rebalance) is not believed.
    assert_eq!(t.merge(&b, &claims(4, vec![full.clone()])), Merged { changed: 0, refused: 4096 });
    assert!(is(t.node(0, 0), &a) && t.regime(0) == 5);
    // The same regime is accepted.
    assert_eq!(t.merge(&b, &claims(5, vec![low.clone()])), Merged { changed: 2048, refused: 0 });
    assert!(is(t.node(0, 0), &b) && is(t.node(0, 4095), &a));
    // A higher regime wins everywhere and raises the bar.
    assert_eq!(t.merge(&a, &claims(6, vec![full.clone()])), Merged { changed: 2048, refused: 0 });
    assert!((0..4096).all(|p| t.regime(p) == 6));
    assert_eq!(t.merge(&b, &claims(5, vec![low])), Merged { changed: 0, refused: 2048 });
    assert!(is(t.node(0, 0), &a));
    // A node that stops claiming keeps the partition until another claims it.
    assert_eq!(t.merge(&a, &claims(6, vec![bitmap(|_| false)])), Merged::default());
    assert!((0..4096).all(|p| is(t.node(0, p), &a)));
    assert!(t.sc);
}

#[test]
fn merge_ap_claims_per_replica_index() {
    let (a, b) = (node("A"), node("B"));
    let (full, empty) = (bitmap(|_| true), bitmap(|_| false));
    let mut t = PartitionTable::new(false);
    t.merge(&a, &claims(0, vec![full.clone(), empty.clone()]));
    t.merge(&b, &claims(0, vec![empty.clone(), full.clone()]));
    assert!(is(t.node(0, 7), &a) && is(t.node(1, 7), &b));
    assert!(!t.sc);
    // Routing: writes (master only) go to A; reads take the replicas in turn.
    assert!(is(t.route(7, 0, true), &a) && is(t.route(7, 1, true), &a));
    assert!(is(t.route(7, 0, false), &a) && is(t.route(7, 1, false), &b) && is(t.route(7, 2, false), &a));
    // B becomes master: its replica slot stays until A claims it.
    assert_eq!(t.merge(&b, &claims(0, vec![full.clone(), empty.clone()])).changed, 4096);
    assert!(is(t.node(0, 7), &b) && is(t.node(1, 7), &b));
    assert_eq!(t.merge(&a, &claims(0, vec![empty, full])).changed, 4096);
    assert!(is(t.node(1, 7), &a));
    // A dropped node leaves empty slots; reads skip them.
    assert!(t.forget(&b) && !t.holds_any(&b) && t.holds_any(&a));
    assert!(t.node(0, 7).is_none());
    assert!(t.route(7, 0, true).is_none());
    assert!(is(t.route(7, 0, false), &a));
}

/// A fake node's answers and what it was asked.
#[derive(Debug, Clone)]
struct FakeState {
    name: String,
    peers_generation: i64,
    partition_generation: i64,
    /// `[name,tls,[addrs]]` entries.
    peers: Vec<String>,
    replicas: String,
    /// Result code of every data command; None: never answer.
    result: Option<u8>,
    data_commands: u64,
}

/// A node on the loopback that speaks just enough of the protocol: info answers from its
/// state, and a header-only reply with the configured result code to any data command.
#[derive(Debug)]
struct FakeNode {
    addr: SocketAddr,
    state: Arc<Mutex<FakeState>>,
    tasks: Arc<Mutex<Vec<AbortHandle>>>,
}

impl FakeNode {
    async fn start(name: &str, replicas: &str) -> FakeNode {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name, replicas).await
    }

    async fn start_on(addr: SocketAddr, name: &str, replicas: &str) -> FakeNode {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(FakeState {
            name: name.into(),
            peers_generation: 1,
            partition_generation: 1,
            peers: Vec::new(),
            replicas: replicas.into(),
            result: Some(0),
            data_commands: 0,
        }));
        let tasks: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let (st, ts) = (state.clone(), tasks.clone());
        let accept = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                let conn = tokio::spawn(serve(s, st.clone()));
                ts.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        FakeNode { addr, state, tasks }
    }

    fn set(&self, f: impl FnOnce(&mut FakeState)) {
        f(&mut self.state.lock().unwrap());
    }

    fn data_commands(&self) -> u64 {
        self.state.lock().unwrap().data_commands
    }

    /// This node as a peers-list entry.
    fn entry(&self) -> String {
        format!("[{},,[{}]]", self.state.lock().unwrap().name, self.addr)
    }

    /// Stops listening and closes every connection: connecting is refused from now on.
    fn kill(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

impl Drop for FakeNode {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn serve(mut s: TcpStream, state: Arc<Mutex<FakeState>>) {
    loop {
        let mut h = [0u8; 8];
        if s.read_exact(&mut h).await.is_err() {
            return;
        }
        let Ok(header) = ProtoHeader::decode(h, PROTO_BODY_BYTES_MAX) else { return };
        let mut body = vec![0u8; header.size as usize];
        if s.read_exact(&mut body).await.is_err() {
            return;
        }
        let reply = if header.msg_type == msg_type::INFO {
            let mut out = Vec::new();
            {
                let st = state.lock().unwrap();
                for command in parse_request(&body) {
                    let value = match command {
                        "node" => st.name.clone(),
                        "peers-generation" => st.peers_generation.to_string(),
                        "partition-generation" => st.partition_generation.to_string(),
                        "peers-clear-std" => format!("{},3000,[{}]", st.peers_generation, st.peers.join(",")),
                        "replicas" => st.replicas.clone(),
                        _ => "ERROR:4:unrecognized command".into(),
                    };
                    put_answer(&mut out, command, &value);
                }
            }
            let mut frame = ProtoHeader::encode(msg_type::INFO, out.len() as u64).to_vec();
            frame.extend_from_slice(&out);
            frame
        } else {
            let result = {
                let mut st = state.lock().unwrap();
                st.data_commands += 1;
                st.result
            };
            let Some(code) = result else {
                std::future::pending::<()>().await;
                return;
            };
            let mut buf = Vec::new();
            let start = begin_frame(&mut buf, msg_type::MESSAGE);
            put_msg_header(&mut buf, &MsgHeader { result_code: code, ..MsgHeader::default() });
            end_frame(&mut buf, start);
            buf
        };
        if s.write_all(&reply).await.is_err() {
            return;
        }
    }
}

/// Fast tends; commands get `total_ms`.
fn options(total_ms: u64) -> ClientOptions {
    ClientOptions {
        total_timeout: Duration::from_millis(total_ms),
        read_attempt_timeout: Duration::from_millis(total_ms / 2),
        tend_interval: Duration::from_millis(20),
        tend_timeout: Duration::from_millis(500),
    }
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Partition 0x707 = 1799.
const DIGEST: [u8; 20] = [7; 20];

fn master(client: &Client) -> Option<String> {
    client.route("test", partition_of(&DIGEST), 0, true).ok().map(|n| n.name.clone())
}

async fn put(client: &Client) -> Result<(), ClientError> {
    client.put("test", "s", &DIGEST, &[(b"b".to_vec(), 4, vec![1])], WriteMode::Update, None).await
}

#[tokio::test]
async fn client_follows_new_peers_and_a_partition_move() {
    let a = FakeNode::start("A", &format!("test:0,1,{}", all())).await;
    let b = FakeNode::start("B", &format!("test:0,1,{}", none())).await;
    b.set(|s| s.peers = vec![a.entry()]);
    let client = Client::connect_with(&[a.addr], options(2000)).await.unwrap();
    assert_eq!(client.node_names(), ["A"]);
    put(&client).await.unwrap();
    assert_eq!((a.data_commands(), b.data_commands()), (1, 0));

    // A learns of B: a new peers generation makes the client read the list and connect.
    let entry = b.entry();
    a.set(|s| {
        s.peers = vec![entry];
        s.peers_generation = 2;
    });
    wait_for("B to be found", || client.node_count() == 2).await;
    assert_eq!(master(&client).as_deref(), Some("A"));

    // The partitions move to B: both partition generations change.
    a.set(|s| {
        s.replicas = format!("test:0,1,{}", none());
        s.partition_generation = 2;
    });
    b.set(|s| {
        s.replicas = format!("test:0,1,{}", all());
        s.partition_generation = 2;
    });
    wait_for("the map to move to B", || master(&client).as_deref() == Some("B")).await;
    put(&client).await.unwrap();
    assert_eq!((a.data_commands(), b.data_commands()), (1, 1));
}

#[tokio::test]
async fn a_node_not_ready_is_not_routed_to_until_its_generation_is_set() {
    let a = FakeNode::start("A", &format!("test:0,1,{}", all())).await;
    a.set(|s| s.partition_generation = -1);
    let client = Client::connect_with(&[a.addr], options(2000)).await.unwrap();
    assert_eq!(client.node_count(), 1);
    assert!(matches!(put(&client).await, Err(ClientError::Result(result::NAMESPACE_NOT_FOUND))));
    a.set(|s| s.partition_generation = 1);
    wait_for("A's map", || master(&client).is_some()).await;
    put(&client).await.unwrap();
}

/// Two nodes listing each other; A is master of every partition and B the replica.
async fn pair(regime: u32) -> (FakeNode, FakeNode) {
    let a = FakeNode::start("A", &format!("test:{regime},2,{},{}", all(), none())).await;
    let b = FakeNode::start("B", &format!("test:{regime},2,{},{}", none(), all())).await;
    let (ea, eb) = (a.entry(), b.entry());
    a.set(|s| s.peers = vec![eb]);
    b.set(|s| s.peers = vec![ea]);
    (a, b)
}

#[tokio::test]
async fn reads_retry_unavailable_on_the_replica_and_writes_do_not() {
    let (a, b) = pair(0).await;
    a.set(|s| s.result = Some(result::PARTITION_UNAVAILABLE));
    let client = Client::connect_with(&[a.addr], options(2000)).await.unwrap();
    assert_eq!(client.node_count(), 2);
    assert_eq!(client.get("test", "s", &DIGEST).await.unwrap(), Some(Vec::new()));
    assert_eq!((a.data_commands(), b.data_commands()), (1, 1));
    assert!(matches!(put(&client).await, Err(ClientError::Result(result::PARTITION_UNAVAILABLE))));
    assert_eq!((a.data_commands(), b.data_commands()), (2, 1), "a write answered 11 is reported, not retried");
}

#[tokio::test]
async fn strong_consistency_reads_stay_on_the_master() {
    let (a, b) = pair(3).await;
    a.set(|s| s.result = Some(result::PARTITION_UNAVAILABLE));
    let client = Client::connect_with(&[a.addr], options(300)).await.unwrap();
    let started = Instant::now();
    assert!(matches!(client.get("test", "s", &DIGEST).await, Err(ClientError::Result(result::PARTITION_UNAVAILABLE))));
    assert!(started.elapsed() >= Duration::from_millis(250), "retried on the master within the budget");
    assert!(a.data_commands() > 1);
    assert_eq!(b.data_commands(), 0, "an SC read never goes to a replica");
}

#[tokio::test]
async fn a_write_to_a_refusing_master_is_retried_once_the_map_moves() {
    let (a, b) = pair(0).await;
    let client = Arc::new(Client::connect_with(&[a.addr], options(3000)).await.unwrap());
    a.kill();
    let started = Instant::now();
    let writer = tokio::spawn({
        let client = client.clone();
        async move { put(&client).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.set(|s| {
        s.replicas = format!("test:0,2,{},{}", all(), none());
        s.partition_generation = 2;
    });
    writer.await.unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(b.data_commands(), 1);
}

#[tokio::test]
async fn a_write_timeout_is_reported_in_doubt_and_a_read_timeout_retried() {
    let (a, b) = pair(0).await;
    a.set(|s| s.result = None);
    let client = Client::connect_with(&[a.addr], options(400)).await.unwrap();
    assert!(matches!(put(&client).await, Err(ClientError::Timeout)));
    assert_eq!((a.data_commands(), b.data_commands()), (1, 0));
    assert_eq!(client.get("test", "s", &DIGEST).await.unwrap(), Some(Vec::new()));
    assert_eq!((a.data_commands(), b.data_commands()), (2, 1));
}

#[tokio::test]
async fn a_dead_node_is_dropped_once_no_peer_lists_it() {
    let (a, b) = pair(0).await;
    let client = Client::connect_with(&[a.addr], options(2000)).await.unwrap();
    assert_eq!(client.node_count(), 2);
    b.kill();
    // Still listed by A: kept however long it fails.
    let tends = client.shared.tends.load(std::sync::atomic::Ordering::Relaxed);
    wait_for("more tends than the failure limit", || {
        client.shared.tends.load(std::sync::atomic::Ordering::Relaxed) > tends + 2 * u64::from(tend::NODE_FAILURES_MAX)
    })
    .await;
    assert_eq!(client.node_count(), 2);
    a.set(|s| {
        s.peers.clear();
        s.peers_generation = 2;
    });
    wait_for("B to be dropped", || client.node_count() == 1).await;
    assert_eq!(client.node_names(), ["A"]);
    // Its replica slots are gone: reads find only A.
    let view = client.view();
    let table = view.tables.get("test").unwrap();
    assert!(table.node(1, 0).is_none());
    assert_eq!(client.get("test", "s", &DIGEST).await.unwrap(), Some(Vec::new()));
}

#[tokio::test]
async fn a_listed_peer_that_could_not_be_reached_is_tried_again() {
    // B's address is free (nothing listens) when A first lists it.
    let b_addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let a = FakeNode::start("A", &format!("test:0,1,{}", all())).await;
    a.set(|s| s.peers = vec![format!("[B,,[{b_addr}]]")]);
    let client = Client::connect_with(&[a.addr], options(2000)).await.unwrap();
    assert_eq!(client.node_names(), ["A"]);
    // B comes up at that address; A's peers generation never changes.
    let _b = FakeNode::start_on(b_addr, "B", &format!("test:0,1,{}", none())).await;
    wait_for("B to be found", || client.node_count() == 2).await;
}

#[tokio::test]
async fn connect_fails_when_no_seed_answers() {
    let a = FakeNode::start("A", "").await;
    let addr = a.addr;
    a.kill();
    assert!(matches!(Client::connect_with(&[addr], options(200)).await, Err(ClientError::Protocol(_))));
}
