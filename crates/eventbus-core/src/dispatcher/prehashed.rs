//! A hasher for maps whose keys already carry a good 64-bit hash (seeded per instance by the
//! code that computes it): the map uses that hash as it is instead of hashing it again.

use std::hash::Hasher;

/// Passes a key's precomputed `u64` hash through. Keys must hash by one `write_u64`; other
/// writes are folded in, so a key that hashes differently still works, only less evenly.
#[derive(Default)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}
