//! A Triton request's inputs, turned into a [`ServeRequest`].
//!
//! Tensor names and meanings follow Triton's vLLM backend: `text_input` (BYTES), optional
//! `stream` (BOOL), `sampling_parameters` (BYTES, JSON) and `exclude_input_in_output` (BOOL); and
//! `input_ids` (INT32) for token-level clients.
//!
//! The sampling values may also come as Triton *request parameters*: tritonserver turns a top-level
//! key of an HTTP `generate` / `generate_stream` body that names no input (`{"text_input": "hi",
//! "max_tokens": 3}`) into one, and gRPC clients set them in the request's `parameters` map. Both
//! ways go through the same parser per value, so they accept and refuse the same things with the
//! same messages; a value given both ways is refused rather than one silently winning, and a
//! parameter pregate does not read is ignored (logged at verbose level), as tritonserver passes
//! through whatever extra keys a client sends (OpenAI-style clients send many).

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

/// The request parameters read besides [`SAMPLING_KEYS`]: the BOOL inputs, for clients (gRPC) that
/// send them as parameters.
pub const FLAG_PARAMETERS: [&str; 2] = ["stream", "exclude_input_in_output"];

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

/// A request parameter's value, typed as Triton types it (`TRITONSERVER_ParameterType`).
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// STRING.
    String(String),
    /// INT.
    Int(i64),
    /// BOOL.
    Bool(bool),
    /// DOUBLE.
    Double(f64),
    /// BYTES (its content is not read).
    Bytes,
}

impl ParamValue {
    /// Triton's name of the value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            ParamValue::String(_) => "STRING",
            ParamValue::Int(_) => "INT",
            ParamValue::Bool(_) => "BOOL",
            ParamValue::Double(_) => "DOUBLE",
            ParamValue::Bytes => "BYTES",
        }
    }

    /// The value as the JSON value a `sampling_parameters` object would hold, so one parser reads
    /// both; `None` for BYTES.
    fn to_json(&self) -> Option<Value> {
        Some(match self {
            ParamValue::String(s) => Value::String(s.clone()),
            ParamValue::Int(n) => Value::from(*n),
            ParamValue::Bool(b) => Value::Bool(*b),
            // JSON has no infinity nor NaN; as text they still fail the number parser, by name.
            ParamValue::Double(x) => serde_json::Number::from_f64(*x)
                .map(Value::Number)
                .unwrap_or_else(|| Value::String(x.to_string())),
            ParamValue::Bytes => return None,
        })
    }
}

/// One request parameter, copied out of the request.
#[derive(Debug, Clone, PartialEq)]
pub struct RawParameter {
    /// Its key.
    pub key: String,
    /// Its value.
    pub value: ParamValue,
}

impl RawParameter {
    /// A parameter `key` = `value`.
    pub fn new(key: &str, value: ParamValue) -> Self {
        RawParameter {
            key: key.to_string(),
            value,
        }
    }
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
    /// The keys of the request parameters that pregate does not read.
    pub ignored_parameters: Vec<String>,
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

/// Reads a request's inputs (and no request parameters).
pub fn parse_request(inputs: &HashMap<String, RawInput>) -> Result<ParsedRequest, String> {
    parse_request_with_parameters(inputs, &[])
}

/// Reads a request's inputs and its request parameters.
pub fn parse_request_with_parameters(
    inputs: &HashMap<String, RawInput>,
    params: &[RawParameter],
) -> Result<ParsedRequest, String> {
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
    let mut seen: Vec<&str> = Vec::new();
    let mut values: Vec<Sampled> = Vec::new();
    let mut ignored_parameters = Vec::new();
    for p in params {
        let key = p.key.as_str();
        let known = SAMPLING_KEYS.contains(&key) || FLAG_PARAMETERS.contains(&key);
        if !known {
            ignored_parameters.push(p.key.clone());
            continue;
        }
        if seen.contains(&key) {
            return Err(format!("request parameter {key} is given twice"));
        }
        seen.push(key);
        let origin = Origin::Parameter(p.value.type_name());
        let value = p.value.to_json().ok_or_else(|| {
            format!(
                "request parameter {key} is BYTES; pregate reads it as a STRING, INT, DOUBLE or BOOL"
            )
        })?;
        values.push(Sampled {
            key: key.to_string(),
            value,
            origin,
        });
    }
    let mut flag = |name: &str| -> Result<bool, String> {
        let param = values.iter().position(|v| v.key == name);
        match (inputs.get(name), param) {
            (Some(_), Some(_)) => Err(conflict(name, "the input")),
            (Some(t), None) => one_bool(name, Some(t)),
            (None, Some(i)) => {
                let v = values.remove(i);
                boolean(&v.field(), &v.value)
            }
            (None, None) => Ok(false),
        }
    };
    let stream = flag("stream")?;
    let exclude_input = flag("exclude_input_in_output")?;
    let mut request = ServeRequest::greedy(prompt, DEFAULT_MAX_TOKENS);
    let from_tensor = match inputs.get("sampling_parameters") {
        Some(t) => sampling_object(&one_string("sampling_parameters", t)?)?,
        None => Vec::new(),
    };
    if let Some(both) = from_tensor
        .iter()
        .find(|t| values.iter().any(|v| v.key == t.key))
    {
        return Err(conflict(&both.key, "sampling_parameters"));
    }
    let source = match (from_tensor.is_empty(), values.is_empty()) {
        (_, true) => "sampling_parameters",
        (true, false) => "request parameters",
        (false, false) => "sampling_parameters and request parameters",
    };
    values.extend(from_tensor);
    apply_values(&mut request, &values, source)?;
    Ok(ParsedRequest {
        request,
        stream,
        exclude_input,
        prompt_text,
        ignored_parameters,
    })
}

fn conflict(key: &str, other: &str) -> String {
    format!("{key} is given both in {other} and as a request parameter; give it once")
}

/// Where a sampling value came from, for messages that name it as the client wrote it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Origin {
    /// A key of the `sampling_parameters` JSON object.
    Json,
    /// A request parameter of this Triton type.
    Parameter(&'static str),
}

/// One sampling value, from either source.
#[derive(Debug, Clone, PartialEq)]
struct Sampled {
    key: String,
    value: Value,
    origin: Origin,
}

impl Sampled {
    fn field(&self) -> Field<'_> {
        Field {
            key: &self.key,
            origin: self.origin,
        }
    }
}

/// A value's name and origin, for its parser's messages.
#[derive(Debug, Clone, Copy)]
struct Field<'a> {
    key: &'a str,
    origin: Origin,
}

impl Field<'_> {
    /// The value's name: `sampling_parameters.top_p`, `request parameter top_p`.
    fn name(&self) -> String {
        match self.origin {
            Origin::Json => format!("sampling_parameters.{}", self.key),
            Origin::Parameter(_) => format!("request parameter {}", self.key),
        }
    }

    /// What the client sent, with a parameter's Triton type.
    fn got(&self, v: &Value) -> String {
        match self.origin {
            Origin::Json => v.to_string(),
            Origin::Parameter(t) => format!("{v} (type {t})"),
        }
    }
}

/// A number, or a string holding one (vLLM's clients send both).
fn number(f: &Field, v: &Value) -> Result<f64, String> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    n.filter(|x| x.is_finite())
        .ok_or_else(|| format!("{} must be a number, got {}", f.name(), f.got(v)))
}

/// A whole number; one past what an i64 holds is refused as too large rather than clamped.
fn whole(f: &Field, v: &Value) -> Result<i64, String> {
    // An i64 as given (an INT parameter) is exact; through f64 it could round.
    if let Some(n) = v.as_i64() {
        return Ok(n);
    }
    let x = number(f, v)?;
    if x.fract() != 0.0 {
        return Err(format!(
            "{} must be a whole number, got {}",
            f.name(),
            f.got(v)
        ));
    }
    // 2^63: the first f64 an i64 cannot hold.
    if x.abs() >= 9_223_372_036_854_775_808.0 {
        return Err(format!("{} is too large, got {}", f.name(), f.got(v)));
    }
    Ok(x as i64)
}

/// A number as f32; one that is finite as f64 but not as f32 (`1e300`) is refused, echoing what
/// the client wrote, rather than read as infinity.
fn float(f: &Field, v: &Value) -> Result<f32, String> {
    let x = number(f, v)? as f32;
    if !x.is_finite() {
        return Err(format!("{} is too large, got {}", f.name(), f.got(v)));
    }
    Ok(x)
}

fn boolean(f: &Field, v: &Value) -> Result<bool, String> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s == "true" || s == "false" => Ok(s == "true"),
        _ => Err(format!(
            "{} must be true or false, got {}",
            f.name(),
            f.got(v)
        )),
    }
}

/// The keys of a `sampling_parameters` JSON object, each checked to be one pregate reads.
fn sampling_object(json: &str) -> Result<Vec<Sampled>, String> {
    let v: Value = serde_json::from_str(json)
        .map_err(|e| format!("sampling_parameters is not valid JSON: {e}"))?;
    let Value::Object(obj) = v else {
        return Err("sampling_parameters must be a JSON object".into());
    };
    obj.into_iter()
        .map(|(key, value)| {
            if SAMPLING_KEYS.contains(&key.as_str()) {
                Ok(Sampled {
                    key,
                    value,
                    origin: Origin::Json,
                })
            } else {
                Err(format!(
                    "sampling_parameters has unknown key `{key}` (known: {})",
                    SAMPLING_KEYS.join(", ")
                ))
            }
        })
        .collect()
}

/// Applies a `sampling_parameters` JSON object to `r`.
pub fn apply_sampling(r: &mut ServeRequest, json: &str) -> Result<(), String> {
    apply_values(r, &sampling_object(json)?, "sampling_parameters")
}

/// Applies sampling values (each key once, from [`SAMPLING_KEYS`]) to `r`; `source` names where
/// they came from in the message of a combination [`SamplingParams::validate`] refuses.
fn apply_values(r: &mut ServeRequest, values: &[Sampled], source: &str) -> Result<(), String> {
    let mut s = SamplingParams::greedy();
    for v in values {
        apply_value(r, &mut s, &v.field(), &v.value)?;
    }
    s.validate().map_err(|e| match e {
        pregate::Error::InvalidRequest(m) => format!("{source}: {m}"),
        other => format!("{source}: {other}"),
    })?;
    r.sampling = s;
    Ok(())
}

/// The one parser of each sampling value, whichever way it came.
fn apply_value(
    r: &mut ServeRequest,
    s: &mut SamplingParams,
    f: &Field,
    val: &Value,
) -> Result<(), String> {
    let list_of_strings = || format!("{} must be a string or a list of strings", f.name());
    match f.key {
        "max_tokens" => {
            let n = whole(f, val)?;
            if n < 1 {
                return Err(format!("{} must be >= 1, got {n}", f.name()));
            }
            r.max_new_tokens = usize::try_from(n)
                .map_err(|_| format!("{} is too large, got {}", f.name(), f.got(val)))?;
        }
        "temperature" => s.temperature = float(f, val)?,
        "top_p" => s.top_p = float(f, val)?,
        "top_k" => {
            let text = match val {
                Value::String(t) => t.clone(),
                other => other.to_string(),
            };
            s.top_k = pregate::sampling::parse_top_k(&text).map_err(|e| {
                let m = match e {
                    pregate::Error::InvalidRequest(m) => m,
                    other => other.to_string(),
                };
                match f.origin {
                    Origin::Json => format!("sampling_parameters.{m}"),
                    Origin::Parameter(t) => format!("request parameter {m} (type {t})"),
                }
            })?;
        }
        "seed" => {
            let n = whole(f, val)?;
            s.seed = Some(
                u64::try_from(n)
                    .map_err(|_| format!("{} must be 0 or more, got {}", f.name(), f.got(val)))?,
            )
        }
        "ignore_eos" => r.ignore_eos = boolean(f, val)?,
        "stop" => {
            r.stop = match val {
                Value::String(x) => vec![x.clone()],
                Value::Array(xs) => xs
                    .iter()
                    .map(|x| x.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(list_of_strings)?,
                Value::Null => Vec::new(),
                _ => return Err(list_of_strings()),
            }
        }
        "stop_token_ids" => {
            let id = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
            r.stop_token_ids = match val {
                // A request parameter holds one value, so one id is accepted as the list of it.
                Value::Number(_) => id(val).map(|n| vec![n]),
                Value::Array(xs) => xs.iter().map(id).collect::<Option<Vec<_>>>(),
                _ => None,
            }
            .ok_or_else(|| {
                format!(
                    "{} must be a token id or a list of token ids, got {}",
                    f.name(),
                    f.got(val)
                )
            })?
        }
        other => {
            return Err(format!(
                "unknown sampling key `{other}` (known: {})",
                SAMPLING_KEYS.join(", ")
            ))
        }
    }
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

    fn with_params(params: &[RawParameter]) -> Result<ParsedRequest, String> {
        parse_request_with_parameters(&inputs(&[("text_input", bytes("hi"))]), params)
    }

    #[test]
    fn request_parameters_set_what_sampling_parameters_sets() {
        let p = with_params(&[
            RawParameter::new("max_tokens", ParamValue::Int(3)),
            RawParameter::new("temperature", ParamValue::Double(0.5)),
            RawParameter::new("top_k", ParamValue::Int(-1)),
            RawParameter::new("top_p", ParamValue::String("0.9".into())),
            RawParameter::new("seed", ParamValue::Int(7)),
            RawParameter::new("stop", ParamValue::String("\n".into())),
            RawParameter::new("stop_token_ids", ParamValue::Int(2)),
            RawParameter::new("ignore_eos", ParamValue::Bool(true)),
            RawParameter::new("stream", ParamValue::Bool(true)),
            RawParameter::new("exclude_input_in_output", ParamValue::Bool(true)),
        ])
        .unwrap();
        assert_eq!(p.request.max_new_tokens, 3);
        assert_eq!(p.request.sampling.temperature, 0.5);
        assert_eq!(p.request.sampling.top_k, 0);
        assert_eq!(p.request.sampling.top_p, 0.9);
        assert_eq!(p.request.sampling.seed, Some(7));
        assert_eq!(p.request.stop, vec!["\n".to_string()]);
        assert_eq!(p.request.stop_token_ids, vec![2]);
        assert!(p.request.ignore_eos && p.stream && p.exclude_input);
        assert!(p.ignored_parameters.is_empty());
        // The same request through sampling_parameters parses the same.
        let q = parse_request(&inputs(&[
            ("text_input", bytes("hi")),
            (
                "sampling_parameters",
                bytes(
                    r#"{"max_tokens": 3, "temperature": 0.5, "top_k": -1, "top_p": "0.9",
                        "seed": 7, "stop": "\n", "stop_token_ids": [2], "ignore_eos": true}"#,
                ),
            ),
        ]))
        .unwrap();
        assert_eq!(p.request, q.request);
    }

    #[test]
    fn unknown_parameters_are_ignored_and_reported() {
        let p = with_params(&[
            RawParameter::new("triton_enable_empty_final_response", ParamValue::Bool(true)),
            RawParameter::new("model", ParamValue::String("gpt".into())),
            RawParameter::new("max_tokens", ParamValue::Int(4)),
        ])
        .unwrap();
        assert_eq!(p.request.max_new_tokens, 4);
        assert_eq!(
            p.ignored_parameters,
            vec!["triton_enable_empty_final_response", "model"]
        );
    }

    #[test]
    fn bad_parameters_are_named_with_their_type() {
        for (param, want) in [
            (
                RawParameter::new("temperature", ParamValue::String("hot".into())),
                "request parameter temperature must be a number, got \"hot\" (type STRING)",
            ),
            (
                RawParameter::new("max_tokens", ParamValue::Bool(true)),
                "request parameter max_tokens must be a number, got true (type BOOL)",
            ),
            (
                RawParameter::new("max_tokens", ParamValue::Double(2.5)),
                "request parameter max_tokens must be a whole number, got 2.5 (type DOUBLE)",
            ),
            (
                RawParameter::new("max_tokens", ParamValue::Int(0)),
                "request parameter max_tokens must be >= 1, got 0",
            ),
            (
                RawParameter::new("temperature", ParamValue::Double(f64::INFINITY)),
                "request parameter temperature must be a number, got \"inf\" (type DOUBLE)",
            ),
            (
                RawParameter::new("temperature", ParamValue::Double(1e300)),
                "request parameter temperature is too large",
            ),
            (
                RawParameter::new("temperature", ParamValue::Int(-1)),
                "request parameters: temperature -1 must be a finite number >= 0",
            ),
            (
                RawParameter::new("seed", ParamValue::Int(-3)),
                "request parameter seed must be 0 or more",
            ),
            (
                RawParameter::new("top_k", ParamValue::String("many".into())),
                "request parameter top_k `many` must be a whole number of tokens (0 or -1: every token) (type STRING)",
            ),
            (
                RawParameter::new("ignore_eos", ParamValue::Int(1)),
                "request parameter ignore_eos must be true or false, got 1 (type INT)",
            ),
            (
                RawParameter::new("stream", ParamValue::String("yes".into())),
                "request parameter stream must be true or false",
            ),
            (
                RawParameter::new("stop", ParamValue::Int(3)),
                "request parameter stop must be a string or a list of strings",
            ),
            (
                RawParameter::new("stop_token_ids", ParamValue::Int(-2)),
                "request parameter stop_token_ids must be a token id or a list of token ids, got -2",
            ),
            (
                RawParameter::new("max_tokens", ParamValue::Bytes),
                "request parameter max_tokens is BYTES",
            ),
        ] {
            let e = with_params(std::slice::from_ref(&param)).unwrap_err();
            assert!(e.contains(want), "{param:?}: {e}");
        }
        let twice = [
            RawParameter::new("seed", ParamValue::Int(1)),
            RawParameter::new("seed", ParamValue::Int(2)),
        ];
        let e = with_params(&twice).unwrap_err();
        assert!(e.contains("seed is given twice"), "{e}");
    }

    #[test]
    fn a_value_given_both_ways_is_refused() {
        let e = parse_request_with_parameters(
            &inputs(&[
                ("text_input", bytes("hi")),
                ("sampling_parameters", bytes(r#"{"max_tokens": 5}"#)),
            ]),
            &[RawParameter::new("max_tokens", ParamValue::Int(3))],
        )
        .unwrap_err();
        assert!(
            e.contains(
                "max_tokens is given both in sampling_parameters and as a request parameter"
            ),
            "{e}"
        );
        let stream = RawInput {
            datatype: dtype::BOOL,
            shape: vec![1],
            data: vec![1],
        };
        let e = parse_request_with_parameters(
            &inputs(&[("text_input", bytes("hi")), ("stream", stream)]),
            &[RawParameter::new("stream", ParamValue::Bool(false))],
        )
        .unwrap_err();
        assert!(e.contains("stream is given both in the input"), "{e}");
        // Different keys from each source combine.
        let p = parse_request_with_parameters(
            &inputs(&[
                ("text_input", bytes("hi")),
                ("sampling_parameters", bytes(r#"{"max_tokens": 5}"#)),
            ]),
            &[RawParameter::new("seed", ParamValue::Int(3))],
        )
        .unwrap();
        assert_eq!(p.request.max_new_tokens, 5);
        assert_eq!(p.request.sampling.seed, Some(3));
    }
}
