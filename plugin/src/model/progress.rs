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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::model::{make_model_with_progress, ExpertLayout, ModelDir, Preset};

    /// Every call, in order: (`what` of start, total) / advanced bytes / finish.
    #[derive(Default)]
    struct Record(Mutex<Vec<(String, u64)>>);

    impl Progress for Record {
        fn start(&self, what: &str, total: u64) {
            self.0.lock().unwrap().push((what.into(), total));
        }
        fn advance(&self, bytes: u64) {
            self.0.lock().unwrap().push(("advance".into(), bytes));
        }
        fn finish(&self) {
            self.0.lock().unwrap().push(("finish".into(), 0));
        }
    }

    impl Record {
        /// (operation, total announced, bytes advanced, whether it finished last).
        fn summary(&self) -> (String, u64, u64, bool) {
            let calls = self.0.lock().unwrap();
            let advanced = calls
                .iter()
                .filter(|(w, _)| w == "advance")
                .map(|(_, b)| b)
                .sum();
            let finished_last = calls.last().is_some_and(|(w, _)| w == "finish")
                && calls.iter().filter(|(w, _)| w == "finish").count() == 1;
            (calls[0].0.clone(), calls[0].1, advanced, finished_last)
        }
    }

    #[test]
    fn writing_and_loading_report_every_byte_then_finish() {
        let dir = tempfile::tempdir().unwrap();
        let written = Record::default();
        let made = make_model_with_progress(
            &Preset::Tiny.spec(),
            ExpertLayout::Fused,
            3,
            dir.path(),
            &written,
        )
        .unwrap();
        assert_eq!(
            written.summary(),
            ("writing".into(), made.bytes as u64, made.bytes as u64, true)
        );

        let loaded = Arc::new(Record::default());
        let model = ModelDir::open(dir.path())
            .unwrap()
            .with_progress(loaded.clone());
        model.load_weights().unwrap();
        let total = model.checkpoint.data_bytes() as u64;
        assert!(total > 0);
        assert_eq!(loaded.summary(), ("loading".into(), total, total, true));
    }
}
