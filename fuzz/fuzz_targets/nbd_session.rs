//! A whole NBD session (handshake, option haggling, transmission) from untrusted client bytes, against an
//! in-memory export: the server never panics and always ends the session once the client's bytes end.
#![no_main]

use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use nbd_server::{serve_connection, BlockBackend, CancellationToken, MemBackend, ServerConfig, SimpleRegistry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(|data: &[u8]| {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
    rt.block_on(async {
        let reg = SimpleRegistry::new()
            .with_export("disk", "", Arc::new(MemBackend::new(1 << 20)) as Arc<dyn BlockBackend>)
            .with_export("ro", "", Arc::new(MemBackend::new_read_only(1 << 20)) as Arc<dyn BlockBackend>);
        let (client, server) = tokio::io::duplex(1 << 16);
        let session =
            tokio::spawn(serve_connection(server, Arc::new(reg), ServerConfig::default(), CancellationToken::new()));
        let (mut cr, mut cw) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = cr.read_to_end(&mut sink).await;
        });
        let _ = cw.write_all(data).await;
        let _ = cw.shutdown().await;
        let ended = tokio::time::timeout(Duration::from_secs(10), session).await;
        assert!(matches!(ended, Ok(Ok(_))), "the session did not end (or panicked) after the client's bytes ended");
        drop(cw);
        let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
    });
});
