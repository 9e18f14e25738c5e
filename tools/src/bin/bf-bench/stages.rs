//! Pipeline ceilings: how fast each stage runs on this machine, through the library's own code paths.
//!
//! Every rate is in MB/s (10^6 bytes) of *user data*: one unit of work is one segment of `segment_bytes`
//! plaintext, whatever the stage touches for it (BLAKE3 hashes all k+m shards, 1.5x the bytes at 4+2), so the
//! figures compare directly with `bf commit` and `bf get` MB/s.

use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::json;

use blockframe::codec::SECTOR;
use blockframe::crypto::{MasterKey, TAG_LEN};
use blockframe::erasure::{shard_len, Codec};
use blockframe::files::commit::shard_leaf;
use blockframe::testing::test_bytes;

/// What to measure.
pub struct Params {
    pub k: usize,
    pub m: usize,
    pub segment_bytes: usize,
    pub seconds: f64,
    pub threads: usize,
}

/// The stages, in pipeline order: (id, label).
const STAGES: [(&str, &str); 5] = [
    ("gcm", "AES-256-GCM encrypt"),
    ("xts", "AES-256-XTS encrypt"),
    ("rs_encode", "RS encode"),
    ("rs_reconstruct", "RS reconstruct"),
    ("blake3", "BLAKE3 shard leaves"),
];

/// One segment's work for one stage; owns its buffers so threads share nothing.
type Work = Box<dyn FnMut() -> Result<()> + Send>;

fn make_work(stage: &str, p: &Params) -> Result<Work> {
    let (k, m, seg) = (p.k, p.m, p.segment_bytes);
    let key = MasterKey::from_bytes([7; 32]);
    // The commit pipeline's layout: ciphertext + tag in k zero-padded shards of `sl` bytes each.
    let sl = shard_len((seg + TAG_LEN) as u64, k);
    Ok(match stage {
        "gcm" => {
            let cipher = key.segment_cipher(&[1; 16]);
            let mut buf = test_bytes(seg + TAG_LEN, 1);
            let mut segment = 0u64;
            Box::new(move || {
                segment += 1;
                Ok(cipher.seal_segment(segment, false, &mut buf, seg)?)
            })
        }
        "xts" => {
            let xts = key.volume_xts(&[2; 16]);
            let mut buf = test_bytes(seg / SECTOR * SECTOR, 2);
            Box::new(move || {
                xts.encrypt(&mut buf, 0);
                Ok(())
            })
        }
        "rs_encode" => {
            let mut codec = Codec::new(k, m)?;
            let data = test_bytes(k * sl, 3);
            Box::new(move || {
                codec.encode_with(&data, sl, |parity| parity.len())?;
                Ok(())
            })
        }
        "rs_reconstruct" => {
            // The worst case a degraded read meets: the m lost shards are data shards, rebuilt from parity.
            let mut codec = Codec::new(k, m)?;
            let mut data = test_bytes(k * sl, 4);
            let mut parity = Vec::new();
            codec.encode(&data, sl, &mut parity)?;
            let lost = m.min(k);
            let have: Vec<bool> = (0..k).map(|i| i >= lost).collect();
            Box::new(move || {
                let good = parity.chunks_exact(sl).take(lost).enumerate();
                Ok(codec.reconstruct(&mut data, sl, &have, good)?)
            })
        }
        "blake3" => {
            let shards = test_bytes((k + m) * sl, 5);
            Box::new(move || {
                for (i, payload) in shards.chunks_exact(sl).enumerate() {
                    std::hint::black_box(shard_leaf(&[3; 16], 0, i as u16, payload));
                }
                Ok(())
            })
        }
        _ => unreachable!("unknown stage {stage}"),
    })
}

/// Runs `threads` copies of a stage for `seconds` each (after one warm-up segment); returns MB/s of user data.
fn rate(stage: &str, p: &Params, threads: usize) -> Result<f64> {
    let mut works = (0..threads).map(|_| make_work(stage, p)).collect::<Result<Vec<_>>>()?;
    let budget = Duration::from_secs_f64(p.seconds);
    let start = Barrier::new(threads);
    let counts = std::thread::scope(|s| {
        let handles: Vec<_> = works
            .iter_mut()
            .map(|work| {
                let start = &start;
                s.spawn(move || -> Result<(u64, Duration)> {
                    work()?;
                    start.wait();
                    let t0 = Instant::now();
                    let mut n = 0u64;
                    while n == 0 || t0.elapsed() < budget {
                        work()?;
                        n += 1;
                    }
                    Ok((n, t0.elapsed()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("stage thread panicked")).collect::<Result<Vec<_>>>()
    })?;
    let segments: u64 = counts.iter().map(|(n, _)| n).sum();
    let secs = counts.iter().map(|(_, t)| t.as_secs_f64()).fold(0.0, f64::max);
    Ok(segments as f64 * p.segment_bytes as f64 / secs / 1e6)
}

/// Measures every stage; returns the JSON report.
pub fn run(p: &Params) -> Result<serde_json::Value> {
    ensure!(p.threads >= 1 && p.seconds > 0.0, "need at least one thread and a positive duration");
    ensure!(p.segment_bytes >= SECTOR, "segment must be at least one {SECTOR}-byte sector");
    blockframe::erasure::validate(p.k, p.m)?;
    let mut stages = Vec::new();
    for (id, label) in STAGES {
        let single = rate(id, p, 1)?;
        let all = if p.threads > 1 { rate(id, p, p.threads)? } else { single };
        stages.push(json!({ "id": id, "name": label, "single_core_MBps": single, "all_core_MBps": all }));
    }
    Ok(json!({
        "k": p.k,
        "m": p.m,
        "segment_bytes": p.segment_bytes,
        "threads": p.threads,
        "seconds_per_run": p.seconds,
        "stages": stages,
    }))
}
