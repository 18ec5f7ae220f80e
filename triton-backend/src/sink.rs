//! A request's responses: the serving loop's [`ResponseSink`] over a Triton response factory.

use std::time::{Duration, Instant};

use pregate::serve::{Completion, Outcome, ResponseSink, TokenDelta};
use pregate::{Error, ErrorCode};

use crate::bridge::{code, ffi, log};

/// A response factory pointer.
pub struct Factory(pub *mut ffi::TRITONBACKEND_ResponseFactory);
// SAFETY: Triton's response factories may be used from any thread (the decoupled API is designed
// for a backend thread other than the one that ran Execute); one sink owns each factory.
unsafe impl Send for Factory {}

impl Drop for Factory {
    fn drop(&mut self) {
        if !self.0.is_null() {
            // SAFETY: created by factory_new, deleted once here.
            let _ = unsafe { ffi::factory_delete(self.0) };
        }
    }
}

/// Streams a request's tokens as Triton responses; the last response is flagged final.
pub struct TritonSink {
    factory: Factory,
    stream: bool,
    prefix: Option<String>,
    text: Vec<u8>,
    ids: Vec<i32>,
    sent_final: bool,
    created: Instant,
    first_token: Option<Duration>,
}

impl TritonSink {
    /// A sink; `prefix` is prepended to a non-streamed `text_output` (the prompt, unless excluded).
    pub fn new(factory: Factory, stream: bool, prefix: Option<String>) -> Self {
        TritonSink {
            factory,
            stream,
            prefix,
            text: Vec::new(),
            ids: Vec::new(),
            sent_final: false,
            created: Instant::now(),
            first_token: None,
        }
    }

    /// Sends an error response flagged final.
    pub fn send_error(&mut self, code_: u32, msg: &str) {
        if self.sent_final {
            return;
        }
        self.sent_final = true;
        // SAFETY: the factory is live until this sink drops.
        if let Err(e) = unsafe { ffi::send_error(self.factory.0, code_, msg) } {
            ffi::log_message(
                log::ERROR,
                &format!("pregate: cannot send an error response: {e}"),
            );
            // SAFETY: as above.
            let _ = unsafe { ffi::factory_send_final(self.factory.0) };
        }
    }

    fn send_final_flag(&mut self) {
        if !self.sent_final {
            self.sent_final = true;
            // SAFETY: the factory is live until this sink drops.
            if let Err(e) = unsafe { ffi::factory_send_final(self.factory.0) } {
                ffi::log_message(
                    log::ERROR,
                    &format!("pregate: cannot send the final flag: {e}"),
                );
            }
        }
    }
}

/// The Triton error code for a pregate error, by its stable [`ErrorCode`].
pub fn error_code(e: &Error) -> u32 {
    triton_code(e.code())
}

/// The Triton error code for a pregate [`ErrorCode`]: Triton has no codes for device, state or
/// model-data faults, so they are all internal errors (the message says which).
pub fn triton_code(c: ErrorCode) -> u32 {
    match c {
        ErrorCode::InvalidArgument => code::INVALID_ARG,
        ErrorCode::NotFound => code::NOT_FOUND,
        ErrorCode::Unavailable => code::UNAVAILABLE,
        ErrorCode::State
        | ErrorCode::Device
        | ErrorCode::ModelData
        | ErrorCode::Io
        | ErrorCode::Internal => code::INTERNAL,
    }
}

impl ResponseSink for TritonSink {
    fn token(&mut self, d: &TokenDelta) -> bool {
        self.first_token
            .get_or_insert_with(|| self.created.elapsed());
        if !self.stream {
            self.text.extend_from_slice(d.text.as_bytes());
            self.ids.push(d.token as i32);
            return true;
        }
        let last = d.finish.is_some();
        // SAFETY: the factory is live until this sink drops.
        let r =
            unsafe { ffi::send_tokens(self.factory.0, d.text.as_bytes(), &[d.token as i32], last) };
        match r {
            Ok(()) => {
                self.sent_final |= last;
                true
            }
            Err(e) => {
                ffi::log_message(
                    log::WARN,
                    &format!("pregate: response not sent, cancelling: {e}"),
                );
                false
            }
        }
    }

    fn finish(&mut self, done: Completion) {
        ffi::log_message(
            log::VERBOSE,
            &completion_line(&done, self.created.elapsed(), self.first_token),
        );
        if self.stream && !done.tail.is_empty() && !self.sent_final {
            // Text held back as a possible stop-string beginning: the client gets it before the
            // error, so its stream still adds up to the generated text. No ids: every token id
            // was already sent with its own response.
            // SAFETY: the factory is live until this sink drops.
            if let Err(e) =
                unsafe { ffi::send_tokens(self.factory.0, done.tail.as_bytes(), &[], false) }
            {
                ffi::log_message(
                    log::VERBOSE,
                    &format!("pregate: held-back text not sent (client gone?): {e}"),
                );
            }
        }
        match done.outcome {
            Outcome::Finished(_) if !self.stream => {
                let mut text = self.prefix.take().unwrap_or_default().into_bytes();
                text.extend_from_slice(&self.text);
                // SAFETY: the factory is live until this sink drops.
                let r = unsafe { ffi::send_tokens(self.factory.0, &text, &self.ids, true) };
                match r {
                    Ok(()) => self.sent_final = true,
                    Err(e) => {
                        self.send_error(code::INTERNAL, &format!("cannot send the response: {e}"))
                    }
                }
            }
            Outcome::Finished(_) => self.send_final_flag(),
            Outcome::Cancelled => self.send_error(code::CANCELLED, "the request was cancelled"),
            Outcome::Failed(e) => self.send_error(error_code(&e), &e.to_string()),
        }
    }

    fn is_cancelled(&mut self) -> bool {
        // SAFETY: the factory is live until this sink drops.
        unsafe { ffi::factory_is_cancelled(self.factory.0) }.unwrap_or(false)
    }
}

/// One request's end, for the verbose log: outcome, tokens, time, time to first token, decode rate.
pub fn completion_line(done: &Completion, total: Duration, first: Option<Duration>) -> String {
    let outcome = match &done.outcome {
        Outcome::Finished(r) => format!("finished ({})", r.as_str()),
        Outcome::Cancelled => "cancelled".into(),
        Outcome::Failed(e) => format!("failed ({})", e.code()),
    };
    let mut line = format!(
        "pregate: request {outcome}: {} prompt tokens, {} generated in {:.3} s",
        done.prompt_tokens,
        done.generated,
        total.as_secs_f64()
    );
    if let Some(first) = first {
        let decode = total.saturating_sub(first).as_secs_f64();
        let rate = if done.generated > 1 && decode > 0.0 {
            (done.generated - 1) as f64 / decode
        } else {
            0.0
        };
        line.push_str(&format!(
            "; first token after {:.3} s, then {rate:.1} tokens/s",
            first.as_secs_f64()
        ));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_line_has_counts_times_and_rate() {
        let done = Completion {
            outcome: Outcome::Finished(pregate::engine::FinishReason::Length),
            prompt_tokens: 4,
            generated: 11,
            tail: String::new(),
        };
        let line = completion_line(
            &done,
            Duration::from_millis(1500),
            Some(Duration::from_millis(500)),
        );
        assert_eq!(
            line,
            "pregate: request finished (length): 4 prompt tokens, 11 generated in 1.500 s; first \
             token after 0.500 s, then 10.0 tokens/s"
        );
        let failed = Completion {
            outcome: Outcome::Failed(Error::InvalidRequest("x".into())),
            prompt_tokens: 0,
            generated: 0,
            tail: String::new(),
        };
        let line = completion_line(&failed, Duration::from_millis(2), None);
        assert_eq!(
            line,
            "pregate: request failed (INVALID_ARGUMENT): 0 prompt tokens, 0 generated in 0.002 s"
        );
    }

    #[test]
    fn every_code_has_its_triton_code() {
        let want = |c: ErrorCode| match c {
            ErrorCode::InvalidArgument => code::INVALID_ARG,
            ErrorCode::NotFound => code::NOT_FOUND,
            ErrorCode::Unavailable => code::UNAVAILABLE,
            _ => code::INTERNAL,
        };
        for c in ErrorCode::ALL {
            assert_eq!(triton_code(c), want(c), "{c}");
        }
    }

    #[test]
    fn an_overloaded_server_is_unavailable_not_a_bad_request() {
        let overloaded = Error::Overloaded("request waited 2 s for admission".into());
        assert_eq!(error_code(&overloaded), code::UNAVAILABLE);
        assert_eq!(error_code(&Error::Capacity("KV".into())), code::UNAVAILABLE);
        assert_eq!(
            error_code(&Error::InvalidRequest("x".into())),
            code::INVALID_ARG
        );
        assert_eq!(error_code(&Error::Internal("x".into())), code::INTERNAL);
    }

    #[test]
    fn errors_map_through_their_codes() {
        use std::sync::Arc;
        let missing = Error::io(
            "model/config.json",
            std::io::Error::from(std::io::ErrorKind::NotFound),
        );
        assert_eq!(error_code(&missing), code::NOT_FOUND);
        assert_eq!(
            error_code(&Error::config("config.json", "head_dim 0")),
            code::INVALID_ARG
        );
        assert_eq!(error_code(&Error::Device("lost".into())), code::INTERNAL);
        assert_eq!(error_code(&Error::ModelData("NaN".into())), code::INTERNAL);
        assert_eq!(error_code(&Error::UnknownSequence(4)), code::INTERNAL);
        // A step that failed for capacity reaches Triton as unavailable, not internal.
        let step = Error::StepFailed(Arc::new(Error::Capacity("KV".into())));
        assert_eq!(error_code(&step), code::UNAVAILABLE);
        let step = Error::StepFailed(Arc::new(Error::Device("lost".into())));
        assert_eq!(error_code(&step), code::INTERNAL);
    }
}
