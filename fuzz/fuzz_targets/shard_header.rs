//! Shard headers and whole shards as read from a location: decoding and verification never panic, and
//! whatever decodes re-encodes to the same header bytes.
#![no_main]

use blockframe::format::shard::{self, Expected, ShardHeader, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = ShardHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..HEADER_LEN], "a decoded header re-encodes differently");
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
