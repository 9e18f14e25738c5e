//! Shard file I/O through a local location, io_uring vs ordinary syscalls: durable put (write + fdatasync +
//! rename), deferred put, and get, of 256 KiB shards (a 1 MiB volume stripe at k=4).
//! Run: `cargo bench --bench io`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use blockframe::location::{IoEngine, LocalDir, Location};

const SHARD: usize = 256 << 10;

fn io(c: &mut Criterion) {
    let mut g = c.benchmark_group("location");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(SHARD as u64));
    let payload = vec![0x5au8; SHARD];
    let mut engines = vec![("std", IoEngine::Std)];
    if IoEngine::parse("uring").is_ok() {
        engines.push(("uring", IoEngine::Uring));
    }
    for (name, engine) in engines {
        let dir = tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
        let loc = LocalDir::with_engine(dir.path(), engine);
        let mut n = 0u64;
        g.bench_function(format!("put_durable_{name}"), |b| {
            b.iter(|| {
                n += 1;
                loc.put(&format!("s/{}", n % 64), &[&payload]).unwrap()
            })
        });
        g.bench_function(format!("put_deferred_{name}"), |b| {
            b.iter(|| {
                n += 1;
                loc.put_deferred(&format!("d/{}", n % 64), &[&payload]).unwrap()
            })
        });
        let mut buf = Vec::new();
        g.bench_function(format!("get_{name}"), |b| b.iter(|| loc.get_into("s/1", &mut buf).unwrap()));
        loc.sync().unwrap();
    }
    g.finish();
}

criterion_group!(benches, io);
criterion_main!(benches);
