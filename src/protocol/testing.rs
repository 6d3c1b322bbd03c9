//! Test support shared by the protocol state machines' unit tests: a tiny deterministic
//! PRNG for their random-input tests (no crate needed, same sequence on every run).

/// xorshift64: plenty for generating hostile input; never for anything secret.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (which must not be 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}
