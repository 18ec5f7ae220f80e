//! The library's progress reports drawn as indicatif bars on stderr, only on a terminal and only
//! for operations large enough to take a while.

use std::io::IsTerminal;
use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use pregate::model::Progress;

/// A bar over bytes, started by the operation it reports.
pub struct Bar {
    min_bytes: u64,
    bar: Mutex<Option<ProgressBar>>,
}

impl Bar {
    /// Writing or converting models larger than this shows a bar.
    pub const WRITE_BYTES: u64 = 256 << 20;
    /// Loading models larger than this shows a bar.
    pub const LOAD_BYTES: u64 = 512 << 20;

    /// A bar for operations over more than `min_bytes`.
    pub fn new(min_bytes: u64) -> Self {
        Bar {
            min_bytes,
            bar: Mutex::new(None),
        }
    }

    fn with(&self, f: impl FnOnce(&mut Option<ProgressBar>)) {
        // A poisoned lock only means another report panicked; the bar is cosmetic.
        let mut guard = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut guard);
    }
}

impl Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        if total <= self.min_bytes || !std::io::stderr().is_terminal() {
            return;
        }
        let pb = ProgressBar::new(total);
        let template =
            format!("{what} {{bar:40}} {{bytes}}/{{total_bytes}} ({{bytes_per_sec}}, {{eta}})");
        if let Ok(style) = ProgressStyle::with_template(&template) {
            pb.set_style(style);
        }
        self.with(|bar| *bar = Some(pb));
    }

    fn advance(&self, bytes: u64) {
        self.with(|bar| {
            if let Some(pb) = bar {
                pb.inc(bytes);
            }
        });
    }

    fn finish(&self) {
        self.with(|bar| {
            if let Some(pb) = bar.take() {
                pb.finish_and_clear();
            }
        });
    }
}
