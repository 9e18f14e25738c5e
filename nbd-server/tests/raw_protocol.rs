//! Wire-level tests with a hand-written client on a raw Unix socket:
//! handshake details, malformed options and requests, garbage input,
//! concurrency limits, out-of-order replies and graceful shutdown.
//!
//! The byte layouts here are written out independently of the crate's
//! encoders so that the tests check the wire format, not just symmetry.

mod common;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::TestServer;
use nbd_server::{BlockBackend, Extent, MemBackend, ServerConfig};

const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
const REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQ_MAGIC: u32 = 0x2560_9513;
const SIMPLE_MAGIC: u32 = 0x6744_6698;
const CHUNK_MAGIC: u32 = 0x668e_33ef;
const ERR_UNSUP: u32 = 0x8000_0001;
const ERR_POLICY: u32 = 0x8000_0002;
const ERR_INVALID: u32 = 0x8000_0003;
const ERR_UNKNOWN: u32 = 0x8000_0006;
const EINVAL: u32 = 22;
const EPERM: u32 = 1;
const ENOSPC: u32 = 28;
const SIZE: u64 = 4 << 20;

struct Raw {
    s: UnixStream,
}

struct Chunk {
    flags: u16,
    typ: u16,
    cookie: u64,
    payload: Vec<u8>,
}

impl Raw {
    /// Connect and read the server greeting.
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut r = Raw { s };
        let g = r.read_n(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], IHAVEOPT);
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3, "FIXED_NEWSTYLE|NO_ZEROES");
        r
    }

    /// Connect with client flags FIXED_NEWSTYLE|NO_ZEROES.
    fn start(sock: &Path) -> Raw {
        let mut r = Raw::connect(sock);
        r.send(&3u32.to_be_bytes());
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.s.read_exact(&mut b).expect("read");
        b
    }

    fn u16(&mut self) -> u16 {
        let b = self.read_n(2);
        u16::from_be_bytes([b[0], b[1]])
    }

    fn u32(&mut self) -> u32 {
        let b = self.read_n(4);
        u32::from_be_bytes([b[0], b[1], b[2], b[3]])
    }

    fn u64(&mut self) -> u64 {
        let hi = u64::from(self.u32());
        (hi << 32) | u64::from(self.u32())
    }

    fn opt(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (option, reply type, data).
    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), REP_MAGIC);
        let opt = self.u32();
        let typ = self.u32();
        let len = self.u32() as usize;
        (opt, typ, self.read_n(len))
    }

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            d.extend_from_slice(&r.to_be_bytes());
        }
        d
    }

    /// NBD_OPT_GO; returns (size, transmission flags).
    fn go(&mut self, name: &str, reqs: &[u16]) -> (u64, u16) {
        self.opt(7, &Self::info_data(name, reqs));
        let mut export = None;
        loop {
            let (opt, typ, data) = self.opt_reply();
            assert_eq!(opt, 7);
            match typ {
                3 => {
                    if u16::from_be_bytes([data[0], data[1]]) == 0 {
                        assert_eq!(data.len(), 12);
                        let size = u64::from_be_bytes(data[2..10].try_into().expect("8"));
                        let flags = u16::from_be_bytes([data[10], data[11]]);
                        export = Some((size, flags));
                    }
                }
                1 => return export.expect("NBD_INFO_EXPORT before ACK"),
                other => panic!("GO failed with reply {other:#x}: {:?}", String::from_utf8_lossy(&data)),
            }
        }
    }

    fn structured(&mut self) {
        self.opt(8, &[]);
        let (opt, typ, data) = self.opt_reply();
        assert_eq!((opt, typ, data.len()), (8, 1, 0));
    }

    fn req(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = REQ_MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// A simple reply header: (error, cookie).
    fn simple(&mut self) -> (u32, u64) {
        assert_eq!(self.u32(), SIMPLE_MAGIC);
        let err = self.u32();
        (err, self.u64())
    }

    fn chunk(&mut self) -> Chunk {
        assert_eq!(self.u32(), CHUNK_MAGIC);
        let flags = self.u16();
        let typ = self.u16();
        let cookie = self.u64();
        let len = self.u32() as usize;
        Chunk { flags, typ, cookie, payload: self.read_n(len) }
    }

    /// Whether the server closed the connection (EOF or reset) within 10 s.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
            if Instant::now() > deadline {
                return false;
            }
        }
    }

    /// Write `data` at `offset` and read it back, simple replies.
    fn roundtrip(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.req(0, 1, cookie, offset, data.len() as u32, data);
        assert_eq!(self.simple(), (0, cookie));
        self.req(0, 0, cookie + 1, offset, data.len() as u32, &[]);
        assert_eq!(self.simple(), (0, cookie + 1));
        assert_eq!(self.read_n(data.len()), data);
    }
}

fn server() -> (TestServer, Arc<MemBackend>) {
    let disk = Arc::new(MemBackend::new(SIZE));
    let ro = Arc::new(MemBackend::new_read_only(SIZE));
    let s = TestServer::start(vec![
        ("disk", "rw", disk.clone() as Arc<dyn BlockBackend>),
        ("ro", "ro", ro as Arc<dyn BlockBackend>),
    ]);
    (s, disk)
}

#[test]
fn export_name_with_and_without_zeroes() {
    let (s, _) = server();
    // Client without NO_ZEROES: 124 zero bytes follow size and flags.
    let mut c = Raw::connect(&s.sock);
    c.send(&1u32.to_be_bytes());
    c.opt(1, b"disk");
    assert_eq!(c.u64(), SIZE);
    let flags = c.u16();
    assert_eq!(flags & 1, 1, "HAS_FLAGS");
    assert_eq!(flags & 2, 0, "not read-only");
    assert_eq!(flags & (1 << 7), 0, "no DF without structured replies");
    assert_eq!(c.read_n(124), vec![0u8; 124]);
    c.roundtrip(1, 512, &[7u8; 512]);

    // With NO_ZEROES: the simple reply follows the 10 bytes directly.
    let mut c = Raw::start(&s.sock);
    c.opt(1, b"ro");
    assert_eq!(c.u64(), SIZE);
    assert_eq!(c.u16() & 2, 2, "read-only flag");
    c.req(0, 0, 9, 0, 512, &[]);
    assert_eq!(c.simple(), (0, 9));
    assert_eq!(c.read_n(512), vec![0u8; 512]);
    c.req(0, 1, 10, 0, 512, &[1u8; 512]);
    assert_eq!(c.simple(), (EPERM, 10));
    // Default export "" is the first one ("disk").
    let mut c = Raw::start(&s.sock);
    c.opt(1, b"");
    assert_eq!(c.u64(), SIZE);
    assert_eq!(c.u16() & 2, 0);
}

#[test]
fn handshake_violations_close_the_connection() {
    let (s, _) = server();
    // Unknown client flag.
    let mut c = Raw::connect(&s.sock);
    c.send(&0x10u32.to_be_bytes());
    assert!(c.closed(), "unknown client flags must close");
    // Bad option magic.
    let mut c = Raw::start(&s.sock);
    c.send(b"IHAVEOPX\0\0\0\x07\0\0\0\0");
    assert!(c.closed(), "bad option magic must close");
    // NBD_OPT_EXPORT_NAME for an unknown export cannot be answered.
    let mut c = Raw::start(&s.sock);
    c.opt(1, b"nope");
    assert!(c.closed(), "unknown export via EXPORT_NAME must close");
    // An absurd option length (1 GiB) is treated as denial of service.
    let mut c = Raw::start(&s.sock);
    let mut b = IHAVEOPT.to_vec();
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.send(&b);
    assert!(c.closed(), "huge option must close");
    // Peer vanishing mid-handshake is harmless.
    let mut c = Raw::start(&s.sock);
    c.send(&IHAVEOPT[..4]);
    drop(c);
    // The server still works.
    let mut c = Raw::start(&s.sock);
    c.go("disk", &[]);
    c.roundtrip(1, 0, &[1u8; 1024]);
}

#[test]
fn option_errors_keep_the_session_alive() {
    let (s, _) = server();
    let mut c = Raw::start(&s.sock);
    // Unknown option (with data to skip).
    c.opt(0x1234, &[1, 2, 3, 4, 5]);
    assert_eq!(c.opt_reply().1, ERR_UNSUP);
    // STARTTLS refused by policy: this server has no TLS configured.
    c.opt(5, &[]);
    assert_eq!(c.opt_reply().1, ERR_POLICY);
    // LIST must not carry data.
    c.opt(3, &[0]);
    assert_eq!(c.opt_reply().1, ERR_INVALID);
    // GO with a name length pointing past the data, and with trailing junk.
    c.opt(7, &[0, 0, 0, 50, b'd', 0, 0]);
    assert_eq!(c.opt_reply().1, ERR_INVALID);
    let mut d = Raw::info_data("disk", &[]);
    d.push(9);
    c.opt(7, &d);
    assert_eq!(c.opt_reply().1, ERR_INVALID);
    // Unknown export.
    c.opt(6, &Raw::info_data("nope", &[]));
    assert_eq!(c.opt_reply().1, ERR_UNKNOWN);
    // SET_META_CONTEXT before structured replies.
    let mut meta = 4u32.to_be_bytes().to_vec();
    meta.extend_from_slice(b"disk");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    c.opt(10, &meta);
    assert_eq!(c.opt_reply().1, ERR_INVALID);
    // A meta context request with a truncated query.
    c.opt(9, &meta[..meta.len() - 1]);
    assert_eq!(c.opt_reply().1, ERR_INVALID);

    // LIST: one NBD_REP_SERVER per export, then ACK.
    c.opt(3, &[]);
    let mut names = Vec::new();
    loop {
        let (opt, typ, data) = c.opt_reply();
        assert_eq!(opt, 3);
        if typ == 1 {
            break;
        }
        assert_eq!(typ, 2);
        let n = u32::from_be_bytes(data[..4].try_into().expect("4")) as usize;
        names.push(String::from_utf8(data[4..4 + n].to_vec()).expect("utf8"));
    }
    assert_eq!(names, vec!["disk", "ro"]);

    // INFO with NAME, DESCRIPTION and BLOCK_SIZE requested.
    c.opt(6, &Raw::info_data("disk", &[1, 2, 3]));
    let mut seen = Vec::new();
    loop {
        let (opt, typ, data) = c.opt_reply();
        assert_eq!(opt, 6);
        if typ == 1 {
            break;
        }
        assert_eq!(typ, 3);
        let info = u16::from_be_bytes([data[0], data[1]]);
        match info {
            0 => assert_eq!(data.len(), 12),
            1 => assert_eq!(&data[2..], b"disk"),
            2 => assert_eq!(&data[2..], b"rw"),
            3 => {
                assert_eq!(data.len(), 14);
                assert_eq!(&data[2..6], &512u32.to_be_bytes());
                assert_eq!(&data[6..10], &4096u32.to_be_bytes());
                assert_eq!(&data[10..14], &(32u32 << 20).to_be_bytes());
            }
            other => panic!("unexpected info {other}"),
        }
        seen.push(info);
    }
    seen.sort();
    assert_eq!(seen, vec![0, 1, 2, 3]);

    // Structured replies, then meta contexts.
    c.structured();
    c.opt(9, &meta);
    let (_, typ, data) = c.opt_reply();
    assert_eq!(typ, 4);
    assert_eq!(&data[4..], b"base:allocation");
    assert_eq!(c.opt_reply().1, 1);
    c.opt(10, &meta);
    let (_, typ, data) = c.opt_reply();
    assert_eq!(typ, 4);
    let ctx_id = u32::from_be_bytes(data[..4].try_into().expect("4"));
    assert_eq!(c.opt_reply().1, 1);

    // And finally GO: DF is advertised with structured replies.
    let (size, flags) = c.go("disk", &[3]);
    assert_eq!(size, SIZE);
    assert_ne!(flags & (1 << 7), 0);
    // Block status on a fresh export: one hole|zero extent.
    c.req(0, 7, 77, 0, 1 << 20, &[]);
    let ch = c.chunk();
    assert_eq!((ch.typ, ch.cookie, ch.flags & 1), (5, 77, 1));
    assert_eq!(&ch.payload[..4], &ctx_id.to_be_bytes());
    assert_eq!(&ch.payload[4..8], &(1u32 << 20).to_be_bytes());
    assert_eq!(&ch.payload[8..12], &3u32.to_be_bytes());
}

#[test]
fn abort_gets_ack_and_close() {
    let (s, _) = server();
    let mut c = Raw::start(&s.sock);
    c.opt(2, &[]);
    let (opt, typ, data) = c.opt_reply();
    assert_eq!((opt, typ, data.len()), (2, 1, 0));
    assert!(c.closed());
}

#[test]
fn malformed_requests_get_errors_simple() {
    let (s, disk) = server();
    let mut c = Raw::start(&s.sock);
    c.go("disk", &[]);
    // Unknown command.
    c.req(0, 42, 1, 0, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 1));
    // Unknown flag on READ; DF without structured replies.
    c.req(0x100, 0, 2, 0, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 2));
    c.req(4, 0, 3, 0, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 3));
    // Out of range, and offset + length overflowing.
    c.req(0, 0, 4, SIZE - 511, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 4));
    c.req(0, 0, 5, u64::MAX - 100, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 5));
    c.req(0, 4, 6, u64::MAX, 2, &[]);
    assert_eq!(c.simple(), (EINVAL, 6));
    // Write beyond the end: ENOSPC, payload consumed.
    c.req(0, 1, 7, SIZE - 100, 512, &[0xee; 512]);
    assert_eq!(c.simple(), (ENOSPC, 7));
    // BLOCK_STATUS without negotiation.
    c.req(0, 7, 8, 0, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 8));
    // Oversized write (above the 32 MiB maximum): EINVAL, payload is read
    // and discarded so the stream stays in sync.
    let big = (32u32 << 20) + 512;
    c.req(0, 1, 9, 0, big, &vec![0xdd; big as usize]);
    assert_eq!(c.simple(), (EINVAL, 9));
    // Oversized READ.
    c.req(0, 0, 10, 0, big, &[]);
    assert_eq!(c.simple(), (EINVAL, 10));
    // Unaligned requests are fine for a client that did not negotiate
    // block sizes.
    c.roundtrip(11, 3, &[0x42; 100]);
    // Nothing from the rejected writes reached the backend.
    let mut b = vec![0u8; 512];
    disk.read(SIZE - 512, &mut b).expect("read");
    assert!(b.iter().all(|&x| x == 0));
    disk.read(200, &mut b).expect("read");
    assert!(b.iter().all(|&x| x == 0));
    // Zero-length read and write are harmless.
    c.req(0, 0, 13, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 13));
    c.req(0, 1, 14, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 14));
    // FLUSH, CACHE, TRIM, WRITE_ZEROES with FUA.
    c.req(0, 3, 15, 0, 0, &[]);
    assert_eq!(c.simple(), (0, 15));
    c.req(1, 5, 16, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 16));
    c.req(1, 4, 17, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 17));
    c.req(1 | 2, 6, 18, 0, 4096, &[]);
    assert_eq!(c.simple(), (0, 18));
    // Disconnect: the server closes after replying to everything.
    c.req(0, 2, 19, 0, 0, &[]);
    assert!(c.closed());
}

#[test]
fn strict_alignment_after_block_size_negotiation() {
    let (s, _) = server();
    let mut c = Raw::start(&s.sock);
    c.go("disk", &[3]);
    c.req(0, 0, 1, 3, 512, &[]);
    assert_eq!(c.simple(), (EINVAL, 1));
    c.req(0, 1, 2, 0, 100, &[0u8; 100]);
    assert_eq!(c.simple(), (EINVAL, 2));
    c.roundtrip(3, 512, &[9u8; 1024]);
}

#[test]
fn structured_replies_and_error_chunks() {
    let (s, _) = server();
    let mut c = Raw::start(&s.sock);
    c.structured();
    c.go("disk", &[]);
    // Failed READ must use a structured error chunk.
    c.req(0, 0, 1, SIZE, 512, &[]);
    let ch = c.chunk();
    assert_eq!((ch.typ, ch.cookie, ch.flags), (0x8001, 1, 1));
    assert_eq!(&ch.payload[..4], &EINVAL.to_be_bytes());
    let mlen = u16::from_be_bytes([ch.payload[4], ch.payload[5]]) as usize;
    assert_eq!(ch.payload.len(), 6 + mlen);
    assert!(mlen > 0, "error chunks carry a message");
    // Successful READ: one OFFSET_DATA chunk with DONE.
    c.req(0, 1, 2, 4096, 512, &[0x77; 512]);
    assert_eq!(c.simple(), (0, 2));
    c.req(4, 0, 3, 4096, 512, &[]); // with DF
    let ch = c.chunk();
    assert_eq!((ch.typ, ch.cookie, ch.flags), (1, 3, 1));
    assert_eq!(&ch.payload[..8], &4096u64.to_be_bytes());
    assert_eq!(&ch.payload[8..], &[0x77; 512][..]);
    // Zero-length READ: NONE chunk.
    c.req(0, 0, 4, 0, 0, &[]);
    let ch = c.chunk();
    assert_eq!((ch.typ, ch.cookie, ch.flags, ch.payload.len()), (0, 4, 1, 0));
    // Non-read error: structured error chunk.
    c.req(0, 99, 5, 0, 0, &[]);
    let ch = c.chunk();
    assert_eq!((ch.typ, ch.cookie), (0x8001, 5));
    // BLOCK_STATUS without SET_META_CONTEXT.
    c.req(0, 7, 6, 0, 512, &[]);
    let ch = c.chunk();
    assert_eq!((ch.typ, ch.cookie), (0x8001, 6));
    assert_eq!(&ch.payload[..4], &EINVAL.to_be_bytes());
}

#[test]
fn garbage_closes_only_that_connection() {
    let (s, disk) = server();
    let mut good = Raw::start(&s.sock);
    good.go("disk", &[]);
    good.roundtrip(100, 0, &[1u8; 4096]);

    // The good session keeps doing I/O in another thread while the bad
    // sessions misbehave.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let worker = std::thread::spawn(move || {
        let mut i = 0u64;
        while !stop2.load(Ordering::SeqCst) || i < 20 {
            let slot = i % 64;
            good.roundtrip(1000 + 2 * i, slot * 8192, &[slot as u8; 8192]);
            i += 1;
        }
        i
    });

    let garbage: Vec<u8> = (0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) as u8).collect();
    for _ in 0..5 {
        // Garbage instead of a request header: the server drops only this
        // connection.
        let mut bad = Raw::start(&s.sock);
        bad.go("disk", &[]);
        bad.send(&garbage);
        assert!(bad.closed(), "server must drop a connection sending garbage");

        // Garbage during the handshake.
        let mut bad2 = Raw::connect(&s.sock);
        bad2.send(&garbage);
        assert!(bad2.closed());

        // A header claiming a write payload, then the client vanishing.
        let mut bad3 = Raw::start(&s.sock);
        bad3.go("disk", &[]);
        bad3.req(0, 1, 1, 2 << 20, 1 << 20, &[0xff; 1000]);
        drop(bad3);

        // A valid request followed by garbage: the valid one is answered.
        let mut bad4 = Raw::start(&s.sock);
        bad4.go("disk", &[]);
        bad4.req(0, 0, 5, 0, 512, &[]);
        bad4.send(&garbage);
        assert_eq!(bad4.simple(), (0, 5));
        bad4.read_n(512);
        assert!(bad4.closed());
    }

    stop.store(true, Ordering::SeqCst);
    let rounds = worker.join().expect("good session failed while others misbehaved");
    assert!(rounds >= 20);
    let mut b = vec![0u8; 8192];
    disk.read(19 * 8192, &mut b).expect("read");
    assert!(b.iter().all(|&x| x == 19));
    // The half-written requests did not reach the backend.
    disk.read(2 << 20, &mut b).expect("read");
    assert!(b.iter().all(|&x| x == 0));
    let mut fresh = Raw::start(&s.sock);
    fresh.go("disk", &[]);
    fresh.roundtrip(1, 0, &[5u8; 512]);
}

/// A MemBackend wrapper that delays reads at offset 0 and counts
/// concurrent backend calls.
struct Slow {
    inner: MemBackend,
    delay: Duration,
    active: AtomicUsize,
    max_active: AtomicUsize,
    calls: AtomicUsize,
}

impl Slow {
    fn new(delay: Duration) -> Self {
        Slow {
            inner: MemBackend::new(SIZE),
            delay,
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
        }
    }

    fn track<T>(&self, slow: bool, f: impl FnOnce() -> T) -> T {
        let now = self.active.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_active.fetch_max(now, Ordering::SeqCst);
        self.calls.fetch_add(1, Ordering::SeqCst);
        if slow {
            std::thread::sleep(self.delay);
        }
        let r = f();
        self.active.fetch_sub(1, Ordering::SeqCst);
        r
    }
}

impl BlockBackend for Slow {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn is_read_only(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.track(offset == 0, || self.inner.read(offset, buf))
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        self.track(true, || self.inner.write(offset, data, fua))
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.inner.trim(offset, len, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.inner.write_zeroes(offset, len, may_trim, fua)
    }
    fn block_status(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        self.inner.block_status(offset, len)
    }
}

#[test]
fn replies_can_overtake_slow_requests() {
    let slow = Arc::new(Slow::new(Duration::from_millis(500)));
    let s = TestServer::start(vec![("d", "", slow.clone() as Arc<dyn BlockBackend>)]);
    let mut c = Raw::start(&s.sock);
    c.go("d", &[]);
    c.req(0, 0, 1, 0, 512, &[]); // slow
    c.req(0, 0, 2, 4096, 512, &[]); // fast
    let (e, cookie) = c.simple();
    assert_eq!((e, cookie), (0, 2), "fast read must be answered first");
    c.read_n(512);
    assert_eq!(c.simple(), (0, 1));
    c.read_n(512);
}

#[test]
fn inflight_requests_are_bounded() {
    let slow = Arc::new(Slow::new(Duration::from_millis(20)));
    let config = ServerConfig { max_inflight_requests: 4, ..ServerConfig::default() };
    let s = TestServer::start_with_config(vec![("d", "", slow.clone() as Arc<dyn BlockBackend>)], config);
    let mut c = Raw::start(&s.sock);
    c.go("d", &[]);
    let n = 40u64;
    // Pipeline all writes without waiting; the server must throttle.
    let mut w = c.s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        for i in 0..n {
            let mut b = REQ_MAGIC.to_be_bytes().to_vec();
            b.extend_from_slice(&0u16.to_be_bytes());
            b.extend_from_slice(&1u16.to_be_bytes());
            b.extend_from_slice(&i.to_be_bytes());
            b.extend_from_slice(&(i * 4096).to_be_bytes());
            b.extend_from_slice(&4096u32.to_be_bytes());
            b.extend_from_slice(&[i as u8; 4096]);
            w.write_all(&b).expect("pipeline write");
        }
    });
    let mut seen = vec![false; n as usize];
    for _ in 0..n {
        let (e, cookie) = c.simple();
        assert_eq!(e, 0);
        assert!(!seen[cookie as usize], "duplicate reply");
        seen[cookie as usize] = true;
    }
    writer.join().expect("writer thread");
    assert!(seen.iter().all(|&x| x));
    let max = slow.max_active.load(Ordering::SeqCst);
    assert!(max <= 4, "at most 4 requests in flight, saw {max}");
    assert!(max >= 2, "requests should run concurrently, saw {max}");
}

#[test]
fn graceful_shutdown_finishes_inflight_and_flushes() {
    let slow = Arc::new(Slow::new(Duration::from_millis(200)));
    let s = TestServer::start(vec![("d", "", slow.clone() as Arc<dyn BlockBackend>)]);
    // One session in transmission with writes in flight, one idle in the
    // handshake.
    let mut c = Raw::start(&s.sock);
    c.go("d", &[]);
    let mut idle = Raw::start(&s.sock);
    for i in 0..8u64 {
        c.req(0, 1, i, i * 4096, 4096, &[0x33; 4096]);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while slow.calls.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "backend never called");
        std::thread::sleep(Duration::from_millis(5));
    }
    let flushes_before = slow.inner.flush_count();
    let stopper = std::thread::spawn(move || s.stop());
    // Every request the server accepted is answered successfully.
    let mut acked = Vec::new();
    loop {
        let mut b = [0u8; 16];
        match c.s.read_exact(&mut b) {
            Ok(()) => {
                assert_eq!(&b[..4], &SIMPLE_MAGIC.to_be_bytes());
                assert_eq!(&b[4..8], &[0, 0, 0, 0], "in-flight write failed");
                acked.push(u64::from_be_bytes(b[8..16].try_into().expect("8")));
            }
            Err(_) => break,
        }
    }
    assert!(!acked.is_empty(), "in-flight requests were answered");
    stopper.join().expect("stop thread").expect("serve returned Ok");
    assert!(idle.closed(), "negotiating sessions are closed on shutdown");
    assert!(slow.inner.flush_count() > flushes_before, "backend flushed at shutdown");
    // Everything acknowledged is in the backend.
    let mut b = vec![0u8; 4096];
    for cookie in acked {
        slow.inner.read(cookie * 4096, &mut b).expect("read");
        assert!(b.iter().all(|&x| x == 0x33));
    }
}
