//! A Triton request's inputs, turned into a [`ServeRequest`].
//!
//! Tensor names and meanings follow Triton's vLLM backend: `text_input` (BYTES), optional
//! `stream` (BOOL), `sampling_parameters` (BYTES, JSON) and `exclude_input_in_output` (BOOL); and
//! `input_ids` (INT32) for token-level clients.

use std::collections::HashMap;

use pregate::sampling::SamplingParams;
use pregate::serve::{Prompt, ServeRequest};
use serde_json::Value;

use crate::bridge::dtype;

/// The inputs the backend reads.
pub const INPUTS: [&str; 5] = [
    "text_input",
    "input_ids",
    "stream",
    "sampling_parameters",
    "exclude_input_in_output",
];

/// The keys `sampling_parameters` may hold.
pub const SAMPLING_KEYS: [&str; 8] = [
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
];

/// Tokens generated when `max_tokens` is absent (vLLM's default).
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// One input tensor, copied out of the request.
#[derive(Debug, Clone, PartialEq)]
pub struct RawInput {
    /// `TRITONSERVER_DataType`.
    pub datatype: u32,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its bytes (BYTES tensors: 4-byte little-endian length, then the bytes, per element).
    pub data: Vec<u8>,
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedRequest {
    /// What to generate.
    pub request: ServeRequest,
    /// One response per token (`stream`), else one response at the end.
    pub stream: bool,
    /// Leave the prompt out of a non-streamed `text_output`.
    pub exclude_input: bool,
    /// The prompt text, when given as text (prepended to a non-streamed output).
    pub prompt_text: Option<String>,
}

/// Splits a BYTES tensor into its elements.
pub fn bytes_elements(data: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err("a BYTES tensor is truncated".into());
        }
        let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest.len() < 4 + n {
            return Err("a BYTES tensor element is truncated".into());
        }
        out.push(&rest[4..4 + n]);
        rest = &rest[4 + n..];
    }
    Ok(out)
}

fn expect_type(name: &str, t: &RawInput, want: u32, want_name: &str) -> Result<(), String> {
    if t.datatype == want {
        Ok(())
    } else {
        Err(format!("input `{name}` must be {want_name}"))
    }
}

fn one_string(name: &str, t: &RawInput) -> Result<String, String> {
    expect_type(name, t, dtype::BYTES, "BYTES")?;
    let elems = bytes_elements(&t.data)?;
    match elems.as_slice() {
        [one] => {
            String::from_utf8(one.to_vec()).map_err(|_| format!("input `{name}` is not UTF-8"))
        }
        _ => Err(format!(
            "input `{name}` must hold exactly one string (batch size 1), got {}",
            elems.len()
        )),
    }
}

fn one_bool(name: &str, t: Option<&RawInput>) -> Result<bool, String> {
    let Some(t) = t else { return Ok(false) };
    expect_type(name, t, dtype::BOOL, "BOOL")?;
    match t.data.as_slice() {
        [b] => Ok(*b != 0),
        _ => Err(format!("input `{name}` must hold one BOOL")),
    }
}

/// Reads a request's inputs.
pub fn parse_request(inputs: &HashMap<String, RawInput>) -> Result<ParsedRequest, String> {
    if let Some(bad) = inputs.keys().find(|k| !INPUTS.contains(&k.as_str())) {
        return Err(format!(
            "unknown input `{bad}` (known: {})",
            INPUTS.join(", ")
        ));
    }
    let (prompt, prompt_text) = match (inputs.get("text_input"), inputs.get("input_ids")) {
        (Some(_), Some(_)) => {
            return Err("send either `text_input` or `input_ids`, not both".into())
        }
        (Some(t), None) => {
            let text = one_string("text_input", t)?;
            (
                Prompt::Text {
                    text: text.clone(),
                    add_bos: true,
                },
                Some(text),
            )
        }
        (None, Some(t)) => {
            expect_type("input_ids", t, dtype::INT32, "INT32")?;
            if t.data.len() % 4 != 0 {
                return Err("input `input_ids` is truncated".into());
            }
            let mut ids = Vec::with_capacity(t.data.len() / 4);
            for c in t.data.chunks_exact(4) {
                let v = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                ids.push(u32::try_from(v).map_err(|_| format!("input_ids holds {v} < 0"))?);
            }
            (Prompt::Ids(ids), None)
        }
        (None, None) => {
            return Err("the request has no `text_input` (BYTES) nor `input_ids` (INT32)".into())
        }
    };
    let mut request = ServeRequest::greedy(prompt, DEFAULT_MAX_TOKENS);
    if let Some(t) = inputs.get("sampling_parameters") {
        let json = one_string("sampling_parameters", t)?;
        apply_sampling(&mut request, &json)?;
    }
    Ok(ParsedRequest {
        request,
        stream: one_bool("stream", inputs.get("stream"))?,
        exclude_input: one_bool(
            "exclude_input_in_output",
            inputs.get("exclude_input_in_output"),
        )?,
        prompt_text,
    })
}

/// A number, or a string holding one (vLLM's clients send both).
fn number(key: &str, v: &Value) -> Result<f64, String> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    n.filter(|x| x.is_finite())
        .ok_or_else(|| format!("sampling_parameters.{key} must be a number, got {v}"))
}

/// A whole number; one past what an i64 holds is refused as too large rather than clamped.
fn whole(key: &str, v: &Value) -> Result<i64, String> {
    let x = number(key, v)?;
    if x.fract() != 0.0 {
        return Err(format!(
            "sampling_parameters.{key} must be a whole number, got {v}"
        ));
    }
    // 2^63: the first f64 an i64 cannot hold.
    if x.abs() >= 9_223_372_036_854_775_808.0 {
        return Err(format!("sampling_parameters.{key} is too large, got {v}"));
    }
    Ok(x as i64)
}

/// A number as f32; one that is finite as f64 but not as f32 (`1e300`) is refused, echoing what
/// the client wrote, rather than read as infinity.
fn float(key: &str, v: &Value) -> Result<f32, String> {
    let x = number(key, v)? as f32;
    if !x.is_finite() {
        return Err(format!("sampling_parameters.{key} is too large, got {v}"));
    }
    Ok(x)
}

fn boolean(key: &str, v: &Value) -> Result<bool, String> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" || s == "false" => Ok(s == "true"),
        _ => Err(format!(
            "sampling_parameters.{key} must be true or false, got {v}"
        )),
    }
}

/// Applies a `sampling_parameters` JSON object to `r`.
pub fn apply_sampling(r: &mut ServeRequest, json: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(json)
        .map_err(|e| format!("sampling_parameters is not valid JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("sampling_parameters must be a JSON object")?;
    let mut s = SamplingParams::greedy();
    for (key, val) in obj {
        match key.as_str() {
            "max_tokens" => {
                let n = whole(key, val)?;
                if n < 1 {
                    return Err(format!(
                        "sampling_parameters.max_tokens must be >= 1, got {n}"
                    ));
                }
                r.max_new_tokens = n as usize;
            }
            "temperature" => s.temperature = float(key, val)?,
            "top_p" => s.top_p = float(key, val)?,
            "top_k" => {
                let text = match val {
                    Value::String(t) => t.clone(),
                    other => other.to_string(),
                };
                s.top_k = pregate::sampling::parse_top_k(&text)
                    .map_err(|e| format!("sampling_parameters.{e}"))?;
            }
            "seed" => {
                let n = whole(key, val)?;
                s.seed = Some(u64::try_from(n).map_err(|_| {
                    format!("sampling_parameters.seed must be 0 or more, got {val}")
                })?)
            }
            "ignore_eos" => r.ignore_eos = boolean(key, val)?,
            "stop" => {
                r.stop = match val {
                    Value::String(x) => vec![x.clone()],
                    Value::Array(xs) => xs
                        .iter()
                        .map(|x| x.as_str().map(str::to_string))
                        .collect::<Option<Vec<_>>>()
                        .ok_or("sampling_parameters.stop must be a string or a list of strings")?,
                    Value::Null => Vec::new(),
                    _ => {
                        return Err(
                            "sampling_parameters.stop must be a string or a list of strings".into(),
                        )
                    }
                }
            }
            "stop_token_ids" => {
                r.stop_token_ids = val
                    .as_array()
                    .and_then(|xs| {
                        xs.iter()
                            .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
                            .collect::<Option<Vec<_>>>()
                    })
                    .ok_or("sampling_parameters.stop_token_ids must be a list of token ids")?
            }
            other => {
                return Err(format!(
                    "sampling_parameters has unknown key `{other}` (known: {})",
                    SAMPLING_KEYS.join(", ")
                ))
            }
        }
    }
    s.validate()
        .map_err(|e| format!("sampling_parameters: {e}"))?;
    r.sampling = s;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &str) -> RawInput {
        let mut data = (s.len() as u32).to_le_bytes().to_vec();
        data.extend_from_slice(s.as_bytes());
        RawInput {
            datatype: dtype::BYTES,
            shape: vec![1],
            data,
        }
    }

    fn inputs(list: &[(&str, RawInput)]) -> HashMap<String, RawInput> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn parses_a_vllm_style_request() {
        let stream = RawInput {
            datatype: dtype::BOOL,
            shape: vec![1],
            data: vec![1],
        };
        let sp = bytes(
            r#"{"max_tokens": "8", "temperature": 0.5, "top_k": -1, "seed": 3, "stop": ["\n"], "ignore_eos": true}"#,
        );
        let p = parse_request(&inputs(&[
            ("text_input", bytes("hello")),
            ("stream", stream),
            ("sampling_parameters", sp),
        ]))
        .unwrap();
        assert!(p.stream && !p.exclude_input);
        assert_eq!(p.request.max_new_tokens, 8);
        assert_eq!(p.request.sampling.temperature, 0.5);
        assert_eq!(p.request.sampling.top_k, 0);
        assert_eq!(p.request.sampling.seed, Some(3));
        assert_eq!(p.request.stop, vec!["\n".to_string()]);
        assert!(p.request.ignore_eos);
        assert_eq!(p.prompt_text.as_deref(), Some("hello"));
    }

    #[test]
    fn token_ids_in() {
        let ids = RawInput {
            datatype: dtype::INT32,
            shape: vec![3],
            data: [1i32, 7, 9].iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        let p = parse_request(&inputs(&[("input_ids", ids)])).unwrap();
        assert_eq!(p.request.prompt, Prompt::Ids(vec![1, 7, 9]));
        assert_eq!(p.request.max_new_tokens, DEFAULT_MAX_TOKENS);
    }

    #[test]
    fn bad_requests_have_clear_messages() {
        let e = parse_request(&inputs(&[("stream", bytes("x"))])).unwrap_err();
        assert!(e.contains("text_input"), "{e}");
        for (sp, want) in [
            ("{not json", "not valid JSON"),
            ("[1]", "JSON object"),
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_tokens": 1.5}"#, "whole"),
            (r#"{"temperature": -1}"#, "temperature"),
            (r#"{"beam_width": 2}"#, "beam_width"),
            (
                r#"{"temperature": 1e300}"#,
                "temperature is too large, got 1e+300",
            ),
            (
                r#"{"temperature": "1e300"}"#,
                "temperature is too large, got \"1e300\"",
            ),
            (r#"{"top_p": 1e39}"#, "top_p is too large"),
            (
                r#"{"max_tokens": 1e300}"#,
                "max_tokens is too large, got 1e+300",
            ),
            (r#"{"seed": -3}"#, "seed must be 0 or more"),
            (r#"{"top_k": -5}"#, "top_k `-5` must be a whole number"),
            (r#"{"top_k": 2.5}"#, "top_k `2.5` must be a whole number"),
        ] {
            let e = parse_request(&inputs(&[
                ("text_input", bytes("hi")),
                ("sampling_parameters", bytes(sp)),
            ]))
            .unwrap_err();
            assert!(e.contains(want), "{sp}: {e}");
        }
        let wrong = RawInput {
            datatype: dtype::INT32,
            shape: vec![1],
            data: vec![0; 4],
        };
        let e = parse_request(&inputs(&[("text_input", wrong)])).unwrap_err();
        assert!(e.contains("BYTES"), "{e}");
    }
}
