//! Progress of long model operations (loading, writing, converting), reported to an observer the
//! caller supplies: the library draws nothing itself, so a host embedding it (the Triton backend)
//! keeps its stderr clean and the command line chooses how to show it.

use std::fmt;

/// Receives the progress of a long operation, measured in bytes of tensor data. The operation may
/// report from several threads at once (the loader converts tensors in parallel).
pub trait Progress: Send + Sync {
    /// An operation over `total` bytes begins; `what` names it (`loading`, `writing`,
    /// `converting`).
    fn start(&self, what: &str, total: u64);
    /// `bytes` more bytes are done.
    fn advance(&self, bytes: u64);
    /// The operation has ended, whether it succeeded or failed.
    fn finish(&self);
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _what: &str, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn finish(&self) {}
}

impl fmt::Debug for dyn Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("dyn Progress")
    }
}

/// Calls [`Progress::finish`] when dropped, so an operation that fails half way still ends its
/// report.
pub(crate) struct Finish<'a>(pub(crate) &'a dyn Progress);

impl Drop for Finish<'_> {
    fn drop(&mut self) {
        self.0.finish();
    }
}
