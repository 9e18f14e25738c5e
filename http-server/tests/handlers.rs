//! The server over an in-memory store with fault injection: responses byte for byte over a raw TCP client,
//! repair with m locations gone, an error status with m+1, and the cap on segment buffers under many
//! concurrent readers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use blockframe::files::catalog;
use blockframe::files::commit::{commit, CommitRequest};
use blockframe::files::read::OpenFile;
use blockframe::testing::mem::{mem_store, MemStore};
use blockframe::testing::test_bytes;
use http_server::segments::{self, SegmentPool};
use http_server::{CancellationToken, Config, Limits, Server};

const SEGMENT: u64 = 64 << 10;

fn store_with(files: &[(&str, &[u8])]) -> (tempfile::TempDir, MemStore) {
    let dir = tempfile::tempdir().unwrap();
    let ms = mem_store(dir.path(), 4, 2, 6, SEGMENT).unwrap();
    for (name, bytes) in files {
        let req = CommitRequest { name: (*name).into(), mode: 0o644, workers: 2, ..Default::default() };
        commit(&ms.store, &mut &bytes[..], &req, &|_| {}).unwrap();
    }
    (dir, ms)
}

/// Starts a server on a loopback port; returns its address and the token that stops it.
async fn serve(store: Arc<blockframe::store::Store>, limits: Limits) -> (String, CancellationToken) {
    let config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        tls: None,
        tls_client_ca: None,
        tokens: None,
        insecure: false,
        writable: false,
        metrics_listen: None,
        limits,
    };
    let server = Server::bind(store, config).await.unwrap();
    let addr = server.local_addr().unwrap().to_string();
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move { server.run(s).await });
    (addr, stop)
}

/// One request with `Connection: close`; returns (status, headers, body).
async fn get(addr: &str, path: &str, extra: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut all)).await;
    let split = all.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&all[..split]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head, all[split + 4..].to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ranges_are_exact_and_repaired_around_lost_locations() {
    let big = test_bytes(700_000, 1);
    let (_dir, ms) = store_with(&[("big.bin", &big), ("d/small.txt", b"small")]);
    let faulty = ms.faulty.clone();
    let (addr, stop) = serve(Arc::new(ms.store), Limits::default()).await;

    let (st, head, body) = get(&addr, "/big.bin", "").await;
    assert_eq!(st, 200, "{head}");
    assert!(body == big);
    let (st, head, body) = get(&addr, "/big.bin", "Range: bytes=65530-131080\r\n").await;
    assert_eq!(st, 206);
    assert!(head.contains("content-range: bytes 65530-131080/700000"), "{head}");
    assert!(body == big[65_530..131_081]);
    let (st, _, body) = get(&addr, "/d/small.txt", "").await;
    assert_eq!((st, body.as_slice()), (200, &b"small"[..]));

    // Two of six locations gone (m = 2): still exact. A third: the read fails with a status, before any byte.
    faulty[0].set_gone(true);
    faulty[3].set_gone(true);
    let (st, _, body) = get(&addr, "/big.bin", "Range: bytes=100000-\r\n").await;
    assert_eq!(st, 206);
    assert!(body == big[100_000..]);
    faulty[5].set_gone(true);
    let (st, _, body) = get(&addr, "/big.bin", "").await;
    assert_eq!(st, 500);
    assert!(String::from_utf8_lossy(&body).contains("data cannot be read and verified"), "{:?}", body);
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_segment_pool_caps_buffers_under_concurrent_readers() {
    let big = test_bytes(16 * SEGMENT as usize, 2);
    let (_dir, ms) = store_with(&[("big.bin", &big)]);
    let store = Arc::new(ms.store);
    let entry = catalog::find(&store, "big.bin").unwrap();
    let file = Arc::new(OpenFile::new(&store, &entry).unwrap());
    let pool = SegmentPool::new(2);
    let live = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let (pool, store, file, live, peak) = (pool.clone(), store.clone(), file.clone(), live.clone(), peak.clone());
        let want = big[(i * SEGMENT) as usize..((i + 1) * SEGMENT) as usize].to_vec();
        tasks.push(tokio::spawn(async move {
            let seg = segments::read(&pool, &store, &file, i).await.unwrap();
            let now = live.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            assert!(seg.bytes() == want, "segment {i}");
            tokio::time::sleep(Duration::from_millis(20)).await;
            live.fetch_sub(1, Ordering::SeqCst);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(peak.load(Ordering::SeqCst) <= 2, "{} segments held at once", peak.load(Ordering::SeqCst));
    assert_eq!(pool.available(), 2);

    // The same bound through HTTP: 16 concurrent range requests on one file, all exact.
    let limits = Limits { segment_buffers: 2, ..Limits::default() };
    let (addr, stop) = serve(store, limits).await;
    let mut reqs = Vec::new();
    for i in 0..16u64 {
        let addr = addr.clone();
        let start = i * 60_000 + 7;
        let want = big[start as usize..(start + 100_000) as usize].to_vec();
        reqs.push(tokio::spawn(async move {
            let (st, _, body) = get(&addr, "/big.bin", &format!("Range: bytes={start}-{}\r\n", start + 99_999)).await;
            assert_eq!(st, 206);
            assert!(body == want, "request {i}");
        }));
    }
    for r in reqs {
        r.await.unwrap();
    }
    stop.cancel();
}
