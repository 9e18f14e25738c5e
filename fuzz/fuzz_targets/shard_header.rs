//! Shard headers and whole shards as read from a location: decoding and verification never panic, and
//! whatever decodes survives a re-encode.
#![no_main]

use blockframe::format::shard::{self, Expected, ShardHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = ShardHeader::decode(data) {
        // The reserved bytes (60..64) are not interpreted, so only the parsed value must survive a round trip.
        assert_eq!(ShardHeader::decode(&h.encode()).ok(), Some(h), "a decoded header does not round-trip");
        let want = Expected {
            store_id: &h.store_id,
            file_id: &h.file_id,
            segment: h.segment,
            shard: h.shard,
            len: h.payload_len,
            leaf: &h.leaf(),
        };
        let _ = shard::verify(data, &want);
    }
    let zero = [0u8; 16];
    let want = Expected { store_id: &zero, file_id: &zero, segment: 0, shard: 0, len: 64, leaf: &[0; 32] };
    let _ = shard::verify(data, &want);
});
