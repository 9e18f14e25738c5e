//! The flush journal of a log-structured volume, read back after a crash from a ring that may hold torn or
//! stale entries: the header and entry decoders never panic, raw or inside a validly MACed envelope.
#![no_main]

use blockframe::crypto::MasterKey;
use blockframe::format::{self, journal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let key = MasterKey::from_bytes([9; 32]);
    let _ = journal::decode_journal_header(data, &key, "fuzz");
    for gen in [0, 1, u64::MAX] {
        let _ = journal::decode_journal_entry(data, &key, gen, "fuzz");
    }
    let Some((&split, rest)) = data.split_first() else { return };
    let (body, blocks) = rest.split_at((split as usize * 4).min(rest.len()));
    let mac = key.log_mac(body);
    for magic in [journal::MAGIC_JOURNAL_HEADER, journal::MAGIC_JOURNAL_ENTRY] {
        let mut sealed = format::seal(magic, &(body, &mac));
        sealed.resize(journal::align_up(sealed.len() as u64) as usize, 0);
        sealed.extend_from_slice(blocks);
        let _ = journal::decode_journal_header(&sealed, &key, "fuzz");
        let _ = journal::decode_journal_entry(&sealed, &key, 1, "fuzz");
    }
});
