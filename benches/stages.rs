//! Throughput of each pipeline stage on one core: AES-256-GCM, Reed-Solomon encode/reconstruct, BLAKE3.
//! Run: `cargo bench --bench stages`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use blockframe::crypto::{MasterKey, TAG_LEN};
use blockframe::erasure::{shard_len, Codec};

const SEGMENT: usize = 32 << 20;

fn stages(c: &mut Criterion) {
    let mut g = c.benchmark_group("stages");
    g.sample_size(10);
    g.throughput(Throughput::Bytes(SEGMENT as u64));
    let key = MasterKey::from_bytes([7; 32]);
    let cipher = key.segment_cipher(&[1; 16]);
    let mut buf = vec![0x5au8; SEGMENT + TAG_LEN];
    g.bench_function("aes256gcm_seal_32MiB", |b| b.iter(|| cipher.seal_segment(0, true, &mut buf, SEGMENT).unwrap()));
    let xts = key.volume_xts(&[2; 16]);
    g.bench_function("aes256xts_32MiB", |b| b.iter(|| xts.encrypt(&mut buf[..SEGMENT], 0)));
    g.bench_function("blake3_32MiB", |b| b.iter(|| blake3::hash(&buf[..SEGMENT])));
    let (k, m) = (4, 2);
    let sl = shard_len((SEGMENT + TAG_LEN) as u64, k);
    let mut data = vec![0x33u8; k * sl];
    let mut codec = Codec::new(k, m).unwrap();
    let mut parity = Vec::new();
    g.bench_function("rs_encode_4+2_32MiB", |b| b.iter(|| codec.encode(&data, sl, &mut parity).unwrap()));
    codec.encode(&data, sl, &mut parity).unwrap();
    let have = [false, true, false, true];
    let p: Vec<(usize, &[u8])> = vec![(0, &parity[..sl]), (1, &parity[sl..])];
    g.bench_function("rs_reconstruct_2_of_4+2_32MiB", |b| {
        b.iter(|| codec.reconstruct(&mut data, sl, &have, p.iter().copied()).unwrap())
    });
    g.finish();
}

criterion_group!(benches, stages);
criterion_main!(benches);
