//! Property tests that drive a whole session (handshake + transmission)
//! through an in-memory pipe with random and semi-valid input. The session
//! must always terminate once the client closes its side, and nothing in the
//! server may panic (a panic hook records panics from any task).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use nbd_server::{serve_connection, BlockBackend, CancellationToken, MemBackend, ServerConfig, SimpleRegistry};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static PANICS: AtomicUsize = AtomicUsize::new(0);
static HOOK: Once = Once::new();

fn install_hook() {
    HOOK.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            prev(info);
        }));
    });
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = b"IHAVEOPT".to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn go(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u16.to_be_bytes());
    d.extend_from_slice(&3u16.to_be_bytes());
    opt(7, &d)
}

fn set_meta(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&15u32.to_be_bytes());
    d.extend_from_slice(b"base:allocation");
    opt(10, &d)
}

/// Handshake prefixes of increasing depth.
fn prefix(kind: u8) -> Vec<u8> {
    let flags = 3u32.to_be_bytes().to_vec();
    match kind {
        0 => Vec::new(),
        1 => flags,
        2 => [flags, go("disk")].concat(),
        3 => [flags, opt(8, &[]), set_meta("disk"), go("disk")].concat(),
        _ => [flags, opt(1, b"ro")].concat(),
    }
}

const SIZE: u64 = 1 << 20;

/// One request with a valid magic and random-ish fields.
fn request() -> impl Strategy<Value = Vec<u8>> {
    let offsets = prop_oneof![Just(0u64), Just(SIZE - 512), Just(SIZE), Just(u64::MAX), 0u64..2 * SIZE,];
    let lens = prop_oneof![Just(0u32), Just(512u32), Just(u32::MAX), Just(33 << 20), 0u32..70_000];
    (any::<u16>(), 0u16..10, any::<u64>(), offsets, lens, 0usize..5000).prop_map(
        |(flags, typ, cookie, offset, len, payload)| {
            // Mostly plausible flags, sometimes anything.
            let flags = if cookie % 3 == 0 { flags } else { flags & 0x1f };
            let mut b = 0x2560_9513u32.to_be_bytes().to_vec();
            b.extend_from_slice(&flags.to_be_bytes());
            b.extend_from_slice(&typ.to_be_bytes());
            b.extend_from_slice(&cookie.to_be_bytes());
            b.extend_from_slice(&offset.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            if typ == 1 {
                let n = (len as usize).min(payload);
                b.extend(std::iter::repeat_n(0xa5u8, n));
            }
            b
        },
    )
}

fn run_session(input: Vec<u8>) -> Result<(), TestCaseError> {
    install_hook();
    let before = PANICS.load(Ordering::SeqCst);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let res: Result<(), String> = rt.block_on(async move {
        let reg = SimpleRegistry::new()
            .with_export("disk", "", Arc::new(MemBackend::new(SIZE)) as Arc<dyn BlockBackend>)
            .with_export("ro", "", Arc::new(MemBackend::new_read_only(SIZE)) as Arc<dyn BlockBackend>);
        let (client, server) = tokio::io::duplex(256 * 1024);
        let session =
            tokio::spawn(serve_connection(server, Arc::new(reg), ServerConfig::default(), CancellationToken::new()));
        let (mut cr, mut cw) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = cr.read_to_end(&mut sink).await;
            sink.len()
        });
        let _ = cw.write_all(&input).await;
        let _ = cw.shutdown().await;
        match tokio::time::timeout(Duration::from_secs(20), session).await {
            Err(_) => return Err("session did not terminate".to_owned()),
            Ok(Err(e)) => return Err(format!("session task failed: {e}")),
            Ok(Ok(())) => {}
        }
        drop(cw);
        match tokio::time::timeout(Duration::from_secs(20), drain).await {
            Err(_) => Err("server never closed its side".to_owned()),
            Ok(_) => Ok(()),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(5));
    res.map_err(TestCaseError::fail)?;
    prop_assert_eq!(PANICS.load(Ordering::SeqCst), before, "a server task panicked");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(kind in 0u8..5, garbage in proptest::collection::vec(any::<u8>(), 0..4096)) {
        run_session([prefix(kind), garbage].concat())?;
    }

    #[test]
    fn semi_valid_requests_never_panic(kind in 2u8..5, reqs in proptest::collection::vec(request(), 1..24), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut input = prefix(kind);
        for r in reqs {
            input.extend_from_slice(&r);
        }
        input.extend_from_slice(&tail);
        run_session(input)?;
    }

    #[test]
    fn random_options_never_panic(opts in proptest::collection::vec((0u32..12, proptest::collection::vec(any::<u8>(), 0..64)), 0..12)) {
        let mut input = 1u32.to_be_bytes().to_vec();
        for (o, d) in opts {
            input.extend_from_slice(&opt(o, &d));
        }
        input.extend_from_slice(&go("disk"));
        run_session(input)?;
    }
}
