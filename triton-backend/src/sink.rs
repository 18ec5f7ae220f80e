//! A request's responses: the serving loop's [`ResponseSink`] over a Triton response factory.

use pregate::serve::{Completion, Outcome, ResponseSink, TokenDelta};
use pregate::Error;

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

/// The Triton error code for a pregate error.
pub fn error_code(e: &Error) -> u32 {
    match e {
        Error::InvalidRequest(_) | Error::InvalidArgument(_) | Error::Tokenizer(_) => {
            code::INVALID_ARG
        }
        Error::Capacity(_) | Error::Overloaded(_) => code::UNAVAILABLE,
        _ => code::INTERNAL,
    }
}

impl ResponseSink for TritonSink {
    fn token(&mut self, d: &TokenDelta) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
