//! Workloads: request traces (JSON lines, Azure CSV), the synthetic generator, and the synthetic
//! expert model that gives simulated requests their routes.
//!
//! # JSON-lines trace format
//! One request per line, in any order (they are sorted by arrival, stably); blank lines and lines
//! starting with `#` are skipped:
//!
//! ```text
//! {"arrival": 0.00, "prompt_len": 120, "output_len": 57}
//! {"arrival": 0.31, "prompt": [1, 15043, 29892], "output_len": 12, "deadline_s": 4.0}
//! ```
//!
//! - `arrival` (number >= 0): seconds from the start of the trace;
//! - exactly one of `prompt` (array of token ids; executed mode feeds them to the model) or
//!   `prompt_len` (integer >= 1; executed mode makes a prompt of that many ids);
//! - `output_len` (integer >= 1): tokens to generate;
//! - `deadline_s` (optional number > 0): seconds after arrival by which the request should finish.
//!
//! Unknown fields are errors (a misspelt field would otherwise be silently ignored).
//!
//! # Azure LLM inference traces
//! The CSV of the Azure public dataset (`TIMESTAMP,ContextTokens,GeneratedTokens`, timestamps like
//! `2023-11-16 18:15:46.6805900`), read directly; arrivals are seconds after the first row.
//!
//! # Synthetic workload
//! Poisson arrivals at `rate` requests/s; prompt and output lengths log-normal, shaped like
//! Chatbot Arena conversations (LMSYS-Chat-1M reports a mean prompt of about 70 tokens and a mean
//! response of about 215): prompt median 40 tokens (sigma 1.2, mean about 80, clamped to 1..2048),
//! output median 150 (sigma 0.9, mean about 225, clamped to 1..1024). Seeded: one seed, one workload.
//!
//! # Synthetic expert model
//! Each request draws a skewed mix over the experts: a Dirichlet whose concentration follows a
//! global popularity (expert `e` of rank `r` in a seeded permutation has weight `1/(r+1)^0.6`, total
//! concentration 2), so some experts are popular overall and each request leans on a few. Each token
//! keeps the previous token's expert with probability `p`, and otherwise draws from the request's
//! mix (which can also return the same expert). `p` is solved per request so that the expected
//! share of tokens keeping the previous expert equals `keep` (default 2921/4096, the paper's
//! measurement of Read-ME's router): `p = (keep - q) / (1 - q)` with `q = sum of squared mix
//! weights`, floored at 0.
//!
//! # Synthetic per-layer routes
//! A model that routes each layer from its own hidden state (Mixtral, Qwen-MoE, OLMoE) gives every
//! token `k` distinct experts at every layer. [`LayerExpertModel`] draws them in a shared
//! *identity* space mapped to each layer by a fixed seeded permutation `pi_l` (`pi_0` the
//! identity), so a layer's expert ids are unrelated in value to the previous layer's but
//! statistically coupled to them. The request's mix is drawn as above (global popularity,
//! Dirichlet). For token `t`, layer `l`, choice `i` (0..k):
//! - with probability `keep` the identity of token `t-1`'s choice `i` at layer `l` (temporal
//!   locality of one sequence; not for a request's first token);
//! - otherwise, with probability `layer_corr`, the identity of the same token's choice `i` at
//!   layer `l-1` (the residual stream changes slowly; not at layer 0);
//! - otherwise an identity drawn from the request's mix.
//!
//! A choice that repeats one already taken at that layer is redrawn from the mix (up to 16 times,
//! then the first identity not taken). The expert is `pi_l(identity)`. The defaults
//! ([`LayerExpertModel::DEFAULT_KEEP`] 0.25, [`LayerExpertModel::DEFAULT_LAYER_CORR`] 0.5) are
//! assumptions chosen to give both kinds of locality a visible share, not measurements of a
//! model; a trace of real routes replaces them (below).
//!
//! # JSON-lines per-layer route traces
//! Routes recorded from a model (one line per token), replayed instead of synthetic ones:
//!
//! ```text
//! {"request": 0, "token": 0, "layers": [[3, 5], [0, 7], [2, 3]]}
//! {"request": 0, "token": 1, "layers": [[3, 1], [0, 6], [2, 4]]}
//! ```
//!
//! - `request` (integer): any id; the trace's requests are taken in increasing id order;
//! - `token` (integer): the token's index in its request; a request's indices must be exactly
//!   `0..n` (any line order);
//! - `layers`: one list per layer of the token's distinct expert ids (its top-k); every line has
//!   the same number of layers and every list the same length `k` (1..=8).
//!
//! Blank lines and `#` lines are skipped; unknown fields are errors. The workload (arrivals and
//! lengths) still comes from a request trace or the synthetic generator: workload request `i`
//! takes its routes from trace request `i mod R` (`R` requests in the route trace), its token `t`
//! from that request's token `t mod n`.

use std::io::{BufRead, BufReader};
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, Gamma, LogNormal};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::route::ExpertId;

/// The paper's measured share of tokens that keep the previous token's expert (2921 of 4096).
pub const READ_ME_KEEP: f64 = 2921.0 / 4096.0;

/// A request's prompt: token ids, or only its length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// The ids themselves.
    Tokens(Vec<u32>),
    /// A length; the ids are made up when needed.
    Len(usize),
}

impl Prompt {
    /// Tokens in the prompt.
    pub fn len(&self) -> usize {
        match self {
            Prompt::Tokens(t) => t.len(),
            Prompt::Len(n) => *n,
        }
    }

    /// Whether the prompt is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One request of a workload.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceRequest {
    /// Seconds from the start of the workload.
    pub arrival: f64,
    /// The prompt.
    pub prompt: Prompt,
    /// Tokens to generate (>= 1).
    pub output_len: usize,
    /// Seconds after arrival by which it should finish.
    pub deadline_s: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    arrival: f64,
    #[serde(default)]
    prompt: Option<Vec<u32>>,
    #[serde(default)]
    prompt_len: Option<usize>,
    output_len: usize,
    #[serde(default)]
    deadline_s: Option<f64>,
}

fn trace_err(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Trace {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

fn sorted(mut v: Vec<TraceRequest>) -> Vec<TraceRequest> {
    v.sort_by(|a, b| a.arrival.total_cmp(&b.arrival));
    v
}

/// Reads a JSON-lines trace (see the module documentation).
pub fn read_jsonl(path: &Path) -> Result<Vec<TraceRequest>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    parse_jsonl(BufReader::new(file), path)
}

/// Parses a JSON-lines trace from `reader`; `path` is used in error messages only.
pub fn parse_jsonl(reader: impl BufRead, path: &Path) -> Result<Vec<TraceRequest>> {
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| trace_err(path, n, e.to_string()))?;
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let j: JsonLine =
            serde_json::from_str(text).map_err(|e| trace_err(path, n, e.to_string()))?;
        if !(j.arrival.is_finite() && j.arrival >= 0.0) {
            return Err(trace_err(
                path,
                n,
                format!("arrival {} must be >= 0", j.arrival),
            ));
        }
        let prompt = match (j.prompt, j.prompt_len) {
            (Some(t), None) => Prompt::Tokens(t),
            (None, Some(n)) => Prompt::Len(n),
            _ => {
                return Err(trace_err(
                    path,
                    n,
                    "give exactly one of `prompt` (token ids) or `prompt_len`",
                ))
            }
        };
        if prompt.is_empty() {
            return Err(trace_err(path, n, "the prompt is empty"));
        }
        if j.output_len == 0 {
            return Err(trace_err(path, n, "output_len must be at least 1"));
        }
        if let Some(d) = j.deadline_s {
            if !(d.is_finite() && d > 0.0) {
                return Err(trace_err(
                    path,
                    n,
                    format!("deadline_s {d} must be positive"),
                ));
            }
        }
        out.push(TraceRequest {
            arrival: j.arrival,
            prompt,
            output_len: j.output_len,
            deadline_s: j.deadline_s,
        });
    }
    Ok(sorted(out))
}

/// Days from 1970-01-01 to the civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Seconds since the epoch of `YYYY-MM-DD HH:MM:SS[.fraction]`.
fn parse_timestamp(s: &str) -> Option<f64> {
    let (date, time) = s.trim().split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, da) = (d.next()??, d.next()??, d.next()??);
    // A four-digit year: a larger one overflows the seconds (and is no trace's).
    if d.next().is_some()
        || !(1..=9999).contains(&y)
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&da)
    {
        return None;
    }
    let mut t = time.split(':');
    let (h, mi, sec) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    if t.next().is_some()
        || !(0..24).contains(&h)
        || !(0..60).contains(&mi)
        || !(0.0..61.0).contains(&sec)
    {
        return None;
    }
    Some((days_from_civil(y, mo, da) * 86_400 + h * 3600 + mi * 60) as f64 + sec)
}

/// Reads an Azure LLM inference trace CSV (`TIMESTAMP,ContextTokens,GeneratedTokens`).
pub fn read_azure_csv(path: &Path) -> Result<Vec<TraceRequest>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    parse_azure_csv(BufReader::new(file), path)
}

/// Parses an Azure trace CSV from `reader`; `path` is used in error messages only.
pub fn parse_azure_csv(reader: impl BufRead, path: &Path) -> Result<Vec<TraceRequest>> {
    let mut lines = reader.lines();
    let header = match lines.next() {
        Some(h) => h.map_err(|e| trace_err(path, 1, e.to_string()))?,
        None => return Err(trace_err(path, 1, "empty file")),
    };
    let cols: Vec<&str> = header.trim().split(',').map(str::trim).collect();
    let find = |name: &str| {
        cols.iter()
            .position(|c| c.eq_ignore_ascii_case(name))
            .ok_or_else(|| trace_err(path, 1, format!("no `{name}` column in the header")))
    };
    let (ti, ci, gi) = (
        find("TIMESTAMP")?,
        find("ContextTokens")?,
        find("GeneratedTokens")?,
    );
    let mut out = Vec::new();
    let mut t0: Option<f64> = None;
    for (i, line) in lines.enumerate() {
        let n = i + 2;
        let line = line.map_err(|e| trace_err(path, n, e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if f.len() != cols.len() {
            return Err(trace_err(
                path,
                n,
                format!("{} fields, the header has {}", f.len(), cols.len()),
            ));
        }
        let ts = parse_timestamp(f[ti])
            .ok_or_else(|| trace_err(path, n, format!("bad TIMESTAMP `{}`", f[ti])))?;
        let num = |k: usize, name: &str| {
            f[k].parse::<usize>()
                .map_err(|_| trace_err(path, n, format!("bad {name} `{}`", f[k])))
        };
        let (ctx, gen) = (num(ci, "ContextTokens")?, num(gi, "GeneratedTokens")?);
        if ctx == 0 || gen == 0 {
            return Err(trace_err(
                path,
                n,
                "ContextTokens and GeneratedTokens must be >= 1",
            ));
        }
        let base = *t0.get_or_insert(ts);
        out.push(TraceRequest {
            arrival: (ts - base).max(0.0),
            prompt: Prompt::Len(ctx),
            output_len: gen,
            deadline_s: None,
        });
    }
    Ok(sorted(out))
}

/// Reads a trace, by extension: `.csv` is an Azure trace, anything else JSON lines.
pub fn read_trace(path: &Path) -> Result<Vec<TraceRequest>> {
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    if csv {
        read_azure_csv(path)
    } else {
        read_jsonl(path)
    }
}

/// Multiplies every arrival by `scale` (< 1 compresses time: a higher load).
pub fn scale_time(reqs: &mut [TraceRequest], scale: f64) -> Result<()> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "time scale {scale} must be positive"
        )));
    }
    for r in reqs {
        r.arrival *= scale;
    }
    Ok(())
}

/// The synthetic workload: `n` requests, Poisson arrivals at `rate` per second (see the module
/// documentation for the length distributions).
pub fn synthetic(n: usize, rate: f64, seed: u64) -> Result<Vec<TraceRequest>> {
    if !(rate.is_finite() && rate > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "request rate {rate} must be positive"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let gap = Exp::new(rate).map_err(|e| Error::InvalidArgument(e.to_string()))?;
    let prompt = LogNormal::new(40f64.ln(), 1.2).map_err(|e| Error::Internal(e.to_string()))?;
    let output = LogNormal::new(150f64.ln(), 0.9).map_err(|e| Error::Internal(e.to_string()))?;
    let mut t = 0.0;
    Ok((0..n)
        .map(|_| {
            t += gap.sample(&mut rng);
            TraceRequest {
                arrival: t,
                prompt: Prompt::Len((prompt.sample(&mut rng).round() as usize).clamp(1, 2048)),
                output_len: (output.sample(&mut rng).round() as usize).clamp(1, 1024),
                deadline_s: None,
            }
        })
        .collect())
}

/// The synthetic expert model's parameters (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExpertModel {
    /// Experts per layer.
    pub experts: usize,
    /// Target share of tokens keeping the previous token's expert.
    pub keep: f64,
    /// Exponent of the global popularity (`1/(rank+1)^skew`).
    pub skew: f64,
    /// Total Dirichlet concentration of a request's mix (smaller: more lopsided mixes).
    pub concentration: f64,
    /// Seed of the global popularity order.
    pub seed: u64,
}

impl ExpertModel {
    /// Read-ME's defaults over `experts` experts.
    pub fn read_me(experts: usize, seed: u64) -> Self {
        ExpertModel {
            experts,
            keep: READ_ME_KEEP,
            skew: 0.6,
            concentration: 2.0,
            seed,
        }
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        if self.experts == 0 || self.experts > crate::route::MAX_EXPERTS {
            return Err(Error::InvalidArgument(format!(
                "{} experts per layer is outside 1..={}",
                self.experts,
                crate::route::MAX_EXPERTS
            )));
        }
        if !(0.0..=1.0).contains(&self.keep) {
            return Err(Error::InvalidArgument(format!(
                "keep probability {} must be in [0, 1]",
                self.keep
            )));
        }
        if !(self.skew.is_finite() && self.skew >= 0.0 && self.concentration > 0.0) {
            return Err(Error::InvalidArgument(
                "expert skew must be >= 0 and concentration > 0".into(),
            ));
        }
        Ok(())
    }

    /// The global popularity weights (sum 1), in expert order.
    pub fn popularity(&self) -> Vec<f64> {
        let mut order: Vec<usize> = (0..self.experts).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x9e37_79b9_7f4a_7c15);
        for i in (1..order.len()).rev() {
            order.swap(i, rng.random_range(0..=i));
        }
        let mut w = vec![0.0; self.experts];
        for (rank, &e) in order.iter().enumerate() {
            w[e] = 1.0 / ((rank + 1) as f64).powf(self.skew);
        }
        let s: f64 = w.iter().sum();
        w.iter().map(|x| x / s).collect()
    }

    /// A request's mix (the cumulative weights over the experts) and its sum of squared weights.
    fn mix_cdf(&self, popularity: &[f64], rng: &mut ChaCha8Rng) -> (Vec<f64>, f64) {
        let mut mix: Vec<f64> = popularity
            .iter()
            .map(|&g| {
                Gamma::new((g * self.concentration).max(1e-3), 1.0)
                    .map(|d| d.sample(rng))
                    .unwrap_or(0.0)
            })
            .collect();
        let s: f64 = mix.iter().sum();
        if s > 0.0 {
            mix.iter_mut().for_each(|x| *x /= s);
        } else {
            mix = popularity.to_vec();
        }
        let q: f64 = mix.iter().map(|x| x * x).sum();
        let mut cdf = mix;
        for i in 1..cdf.len() {
            cdf[i] += cdf[i - 1];
        }
        (cdf, q)
    }

    /// A fresh request stream, seeded per request.
    pub fn stream(&self, popularity: &[f64], request_seed: u64) -> ExpertStream {
        let mut rng = ChaCha8Rng::seed_from_u64(request_seed);
        let (cdf, q) = self.mix_cdf(popularity, &mut rng);
        let p = if q >= 1.0 {
            1.0
        } else {
            ((self.keep - q) / (1.0 - q)).clamp(0.0, 1.0)
        };
        ExpertStream {
            rng,
            cdf,
            keep: p,
            current: None,
        }
    }
}

/// One request's token-by-token expert draws.
#[derive(Debug, Clone)]
pub struct ExpertStream {
    rng: ChaCha8Rng,
    cdf: Vec<f64>,
    keep: f64,
    current: Option<ExpertId>,
}

impl ExpertStream {
    /// The next token's expert.
    pub fn next_expert(&mut self) -> ExpertId {
        if let Some(c) = self.current {
            if self.rng.random::<f64>() < self.keep {
                return c;
            }
        }
        let u = self.rng.random::<f64>() * self.cdf.last().copied().unwrap_or(1.0);
        let e = self
            .cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len() - 1) as ExpertId;
        self.current = Some(e);
        e
    }
}

/// A draw from a cumulative weight table.
fn draw(cdf: &[f64], rng: &mut ChaCha8Rng) -> usize {
    let u = rng.random::<f64>() * cdf.last().copied().unwrap_or(1.0);
    cdf.partition_point(|&c| c <= u).min(cdf.len() - 1)
}

/// The synthetic per-layer route model (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerExpertModel {
    /// Popularity, mixes and seed; `base.keep` is unused (see [`LayerExpertModel::keep`]).
    pub base: ExpertModel,
    /// MoE layers.
    pub layers: usize,
    /// Experts per token at every layer.
    pub top_k: usize,
    /// Probability that a choice repeats the previous token's at the same layer.
    pub keep: f64,
    /// Probability that a choice not kept repeats the previous layer's (through `pi_l`).
    pub layer_corr: f64,
}

impl LayerExpertModel {
    /// Default share of choices kept from the previous token (an assumption, see the module docs).
    pub const DEFAULT_KEEP: f64 = 0.25;
    /// Default share of the other choices following the previous layer (an assumption).
    pub const DEFAULT_LAYER_CORR: f64 = 0.5;

    /// The defaults over `layers` layers of `experts` experts, top-`top_k`.
    pub fn new(layers: usize, experts: usize, top_k: usize, seed: u64) -> Self {
        LayerExpertModel {
            base: ExpertModel::read_me(experts, seed),
            layers,
            top_k,
            keep: Self::DEFAULT_KEEP,
            layer_corr: Self::DEFAULT_LAYER_CORR,
        }
    }

    /// Checks the parameters.
    pub fn validate(&self) -> Result<()> {
        self.base.validate()?;
        if self.layers == 0 || self.layers > u16::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "{} layers is outside 1..={}",
                self.layers,
                u16::MAX
            )));
        }
        if !(1..=crate::route::MAX_TOP_K.min(self.base.experts)).contains(&self.top_k) {
            return Err(Error::InvalidArgument(format!(
                "top-{} of {} experts (at most {})",
                self.top_k,
                self.base.experts,
                crate::route::MAX_TOP_K
            )));
        }
        for (name, p) in [("keep", self.keep), ("layer correlation", self.layer_corr)] {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::InvalidArgument(format!(
                    "{name} probability {p} must be in [0, 1]"
                )));
            }
        }
        Ok(())
    }

    /// The permutations `pi_l` of every layer (`pi_0` the identity), from the model's seed.
    pub fn permutations(&self) -> Vec<Vec<ExpertId>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.base.seed ^ 0x5851_f42d_4c95_7f2d);
        (0..self.layers)
            .map(|l| {
                let mut p: Vec<ExpertId> = (0..self.base.experts as ExpertId).collect();
                if l > 0 {
                    for i in (1..p.len()).rev() {
                        p.swap(i, rng.random_range(0..=i));
                    }
                }
                p
            })
            .collect()
    }

    /// A fresh request stream, seeded per request.
    pub fn stream(
        &self,
        popularity: &[f64],
        perms: std::sync::Arc<Vec<Vec<ExpertId>>>,
        request_seed: u64,
    ) -> LayerStream {
        let mut rng = ChaCha8Rng::seed_from_u64(request_seed);
        let (cdf, _) = self.base.mix_cdf(popularity, &mut rng);
        LayerStream {
            rng,
            cdf,
            perms,
            layers: self.layers,
            top_k: self.top_k,
            keep: self.keep,
            layer_corr: self.layer_corr,
            prev: Vec::new(),
            cur: vec![0; self.layers * self.top_k],
        }
    }
}

/// One request's token-by-token per-layer expert draws.
#[derive(Debug, Clone)]
pub struct LayerStream {
    rng: ChaCha8Rng,
    cdf: Vec<f64>,
    perms: std::sync::Arc<Vec<Vec<ExpertId>>>,
    layers: usize,
    top_k: usize,
    keep: f64,
    layer_corr: f64,
    /// The previous token's identities, `layers x top_k` (empty before the first token).
    prev: Vec<usize>,
    cur: Vec<usize>,
}

impl LayerStream {
    /// Appends the next token's experts to `out`: `layers x top_k` ids, layer by layer.
    pub fn next_token(&mut self, out: &mut Vec<ExpertId>) {
        let k = self.top_k;
        for l in 0..self.layers {
            for i in 0..k {
                let u = self.rng.random::<f64>();
                let mut id = if !self.prev.is_empty() && u < self.keep {
                    self.prev[l * k + i]
                } else if l > 0 && u < self.keep + (1.0 - self.keep) * self.layer_corr {
                    self.cur[(l - 1) * k + i]
                } else {
                    draw(&self.cdf, &mut self.rng)
                };
                let taken = |id: usize, cur: &[usize]| cur[l * k..l * k + i].contains(&id);
                let mut tries = 0;
                while taken(id, &self.cur) && tries < 16 {
                    id = draw(&self.cdf, &mut self.rng);
                    tries += 1;
                }
                if taken(id, &self.cur) {
                    id = (0..self.cdf.len())
                        .find(|&x| !taken(x, &self.cur))
                        .unwrap_or(id);
                }
                self.cur[l * k + i] = id;
            }
            let perm = &self.perms[l];
            out.extend(self.cur[l * k..(l + 1) * k].iter().map(|&id| perm[id]));
        }
        self.prev.clone_from(&self.cur);
    }
}

/// Per-layer routes recorded from a model (see the module documentation for the format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTrace {
    /// Layers of every token.
    pub layers: usize,
    /// Experts per token and layer.
    pub top_k: usize,
    /// Requests in increasing id order; each token `layers x top_k` ids, layer by layer.
    pub requests: Vec<Vec<Vec<ExpertId>>>,
}

impl RouteTrace {
    /// The largest expert id plus one.
    pub fn experts(&self) -> usize {
        self.requests
            .iter()
            .flatten()
            .flatten()
            .max()
            .map_or(0, |&e| e as usize + 1)
    }

    /// Appends the experts of token `token` of workload request `request` to `out` (both wrap,
    /// see the module documentation).
    pub fn token(&self, request: usize, token: usize, out: &mut Vec<ExpertId>) {
        if self.requests.is_empty() {
            return;
        }
        let r = &self.requests[request % self.requests.len()];
        if !r.is_empty() {
            out.extend_from_slice(&r[token % r.len()]);
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RouteLine {
    request: u64,
    token: usize,
    layers: Vec<Vec<ExpertId>>,
}

/// Reads a JSON-lines per-layer route trace (see the module documentation).
pub fn read_route_trace(path: &Path) -> Result<RouteTrace> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    parse_route_jsonl(BufReader::new(file), path)
}

/// Parses a per-layer route trace from `reader`; `path` is used in error messages only.
pub fn parse_route_jsonl(reader: impl BufRead, path: &Path) -> Result<RouteTrace> {
    let mut by_request: std::collections::BTreeMap<u64, Vec<(usize, usize, Vec<ExpertId>)>> =
        Default::default();
    let mut shape: Option<(usize, usize)> = None;
    for (i, line) in reader.lines().enumerate() {
        let n = i + 1;
        let line = line.map_err(|e| trace_err(path, n, e.to_string()))?;
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let j: RouteLine =
            serde_json::from_str(text).map_err(|e| trace_err(path, n, e.to_string()))?;
        let k = j.layers.first().map_or(0, Vec::len);
        if j.layers.is_empty() || !(1..=crate::route::MAX_TOP_K).contains(&k) {
            return Err(trace_err(
                path,
                n,
                format!(
                    "`layers` needs at least one layer of 1..={} experts",
                    crate::route::MAX_TOP_K
                ),
            ));
        }
        let (want_layers, want_k) = *shape.get_or_insert((j.layers.len(), k));
        if j.layers.len() != want_layers {
            return Err(trace_err(
                path,
                n,
                format!(
                    "{} layers, earlier lines have {want_layers}",
                    j.layers.len()
                ),
            ));
        }
        let mut flat = Vec::with_capacity(want_layers * want_k);
        for (l, experts) in j.layers.iter().enumerate() {
            if experts.len() != want_k {
                return Err(trace_err(
                    path,
                    n,
                    format!("layer {l} has {} experts, expected {want_k}", experts.len()),
                ));
            }
            if let Some(&e) = experts
                .iter()
                .find(|&&e| e as usize >= crate::route::MAX_EXPERTS)
            {
                return Err(trace_err(
                    path,
                    n,
                    format!("layer {l}: expert {e} is too large"),
                ));
            }
            for (a, &e) in experts.iter().enumerate() {
                if experts[..a].contains(&e) {
                    return Err(trace_err(path, n, format!("layer {l} repeats expert {e}")));
                }
            }
            flat.extend_from_slice(experts);
        }
        by_request
            .entry(j.request)
            .or_default()
            .push((j.token, n, flat));
    }
    let Some((layers, top_k)) = shape else {
        return Err(trace_err(path, 1, "the route trace has no tokens"));
    };
    let mut requests = Vec::with_capacity(by_request.len());
    for (id, mut tokens) in by_request {
        tokens.sort_by_key(|t| t.0);
        for (want, (token, line, _)) in tokens.iter().enumerate() {
            if *token != want {
                return Err(trace_err(
                    path,
                    *line,
                    format!(
                        "request {id}: token {token} where token {want} was expected \
                         (indices must be 0..n, each once)"
                    ),
                ));
            }
        }
        requests.push(tokens.into_iter().map(|t| t.2).collect());
    }
    Ok(RouteTrace {
        layers,
        top_k,
        requests,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file(text: &str, ext: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(ext).tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn jsonl_reads_both_prompt_forms_and_sorts() {
        let f = file(
            "# comment\n{\"arrival\": 1.5, \"prompt_len\": 3, \"output_len\": 2}\n\n\
             {\"arrival\": 0.5, \"prompt\": [1,2], \"output_len\": 1, \"deadline_s\": 2}\n",
            ".jsonl",
        );
        let r = read_trace(f.path()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].prompt, Prompt::Tokens(vec![1, 2]));
        assert_eq!(r[0].deadline_s, Some(2.0));
        assert_eq!(r[1].prompt, Prompt::Len(3));
    }

    #[test]
    fn malformed_jsonl_lines_are_named_by_number() {
        for (bad, needle) in [
            ("{\"arrival\": 1, \"output_len\": 2}", "exactly one"),
            (
                "{\"arrival\": -1, \"prompt_len\": 2, \"output_len\": 2}",
                "arrival",
            ),
            (
                "{\"arrival\": 1, \"prompt_len\": 2, \"output_len\": 0}",
                "output_len",
            ),
            (
                "{\"arrival\": 1, \"prompt_len\": 2, \"output_len\": 1, \"x\": 1}",
                "unknown field",
            ),
            ("not json", "expected"),
        ] {
            let f = file(
                &format!("{{\"arrival\": 0, \"prompt_len\": 1, \"output_len\": 1}}\n{bad}\n"),
                ".jsonl",
            );
            let err = read_trace(f.path()).unwrap_err().to_string();
            assert!(err.contains(":2:") && err.contains(needle), "{bad}: {err}");
        }
    }

    #[test]
    fn an_azure_timestamp_outside_four_digit_years_is_an_error() {
        // Found by fuzzing: the year 2023333333333 overflowed the seconds since the epoch.
        let data = "TIMESTAMP,ContextTokens,GeneratedTokens\n\
                    2023333333333-11-16 18:15:46.68,377,44\n";
        let err = parse_azure_csv(data.as_bytes(), Path::new("t.csv")).unwrap_err();
        assert!(err.to_string().contains("bad TIMESTAMP"), "{err}");
        let ok = "TIMESTAMP,ContextTokens,GeneratedTokens\n9999-12-31 23:59:59,1,1\n";
        assert_eq!(
            parse_azure_csv(ok.as_bytes(), Path::new("t.csv"))
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn azure_csv_timestamps_become_seconds() {
        let f = file(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n\
             2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n\
             2023-11-16 19:00:00,10,1\n",
            ".csv",
        );
        let r = read_trace(f.path()).unwrap();
        assert_eq!(r[0].arrival, 0.0);
        assert!((r[1].arrival - 4.314579).abs() < 1e-6, "{}", r[1].arrival);
        assert!((r[2].arrival - (44.0 * 60.0 + 13.31941)).abs() < 1e-4);
        assert_eq!((r[1].prompt.len(), r[1].output_len), (396, 109));
        let bad = file(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,1\n2023-13-16 18:15:46,1,1\n",
            ".csv",
        );
        let err = read_trace(bad.path()).unwrap_err().to_string();
        assert!(err.contains(":3:") && err.contains("TIMESTAMP"), "{err}");
        let bad = file(
            "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,x,1\n",
            ".csv",
        );
        assert!(read_trace(bad.path())
            .unwrap_err()
            .to_string()
            .contains(":2:"));
        let bad = file("TIME,Context\n", ".csv");
        assert!(read_trace(bad.path())
            .unwrap_err()
            .to_string()
            .contains("TIMESTAMP"));
    }

    #[test]
    fn synthetic_is_seeded_and_plausible() {
        let a = synthetic(2000, 10.0, 7).unwrap();
        assert_eq!(a, synthetic(2000, 10.0, 7).unwrap());
        assert_ne!(a, synthetic(2000, 10.0, 8).unwrap());
        let rate = a.len() as f64 / a.last().unwrap().arrival;
        assert!((rate - 10.0).abs() < 1.0, "{rate}");
        let mp = a.iter().map(|r| r.prompt.len()).sum::<usize>() as f64 / 2000.0;
        let mo = a.iter().map(|r| r.output_len).sum::<usize>() as f64 / 2000.0;
        assert!((50.0..120.0).contains(&mp), "{mp}");
        assert!((170.0..290.0).contains(&mo), "{mo}");
        assert!(synthetic(1, 0.0, 1).is_err());
    }

    #[test]
    fn per_layer_routes_follow_the_documented_correlations() {
        let mut m = LayerExpertModel::new(6, 16, 2, 5);
        let pop = m.base.popularity();
        let share = |m: &LayerExpertModel| {
            let perms = std::sync::Arc::new(m.permutations());
            let inv: Vec<Vec<usize>> = perms
                .iter()
                .map(|p| {
                    let mut inv = vec![0; p.len()];
                    p.iter().enumerate().for_each(|(i, &e)| inv[e as usize] = i);
                    inv
                })
                .collect();
            let (mut same_token, mut same_layer, mut n) = (0usize, 0usize, 0usize);
            for r in 0..200 {
                let mut s = m.stream(&pop, perms.clone(), r);
                let mut prev: Vec<u16> = Vec::new();
                for _ in 0..50 {
                    let mut t = Vec::new();
                    s.next_token(&mut t);
                    assert_eq!(t.len(), 12);
                    for l in 0..6 {
                        let layer = &t[l * 2..l * 2 + 2];
                        assert!(layer[0] != layer[1] && layer.iter().all(|&e| e < 16));
                        if !prev.is_empty() {
                            same_token += (layer[0] == prev[l * 2]) as usize;
                        }
                        if l > 0 {
                            let up = inv[l - 1][t[(l - 1) * 2] as usize];
                            same_layer += (inv[l][layer[0] as usize] == up) as usize;
                        }
                        n += 1;
                    }
                    prev = t;
                }
            }
            (same_token as f64 / n as f64, same_layer as f64 / n as f64)
        };
        // The knobs alone: keep 1 copies the previous token, layer correlation 1 the layer above.
        m.keep = 1.0;
        assert_eq!(
            share(&m).0,
            49.0 / 50.0,
            "every token but the first repeats the one before"
        );
        m.keep = 0.0;
        m.layer_corr = 1.0;
        assert_eq!(
            share(&m).1,
            5.0 / 6.0,
            "every layer but the first follows the one above"
        );
        // Otherwise the mix adds chance repeats: keep p gives p + (1 - p) x chance.
        m.layer_corr = 0.0;
        let (chance, _) = share(&m);
        m.keep = 0.25;
        let (tok, _) = share(&m);
        let want = 0.25 * 49.0 / 50.0 + (1.0 - 0.25) * chance;
        assert!(
            (tok - want).abs() < 0.02,
            "{tok} vs {want} (chance {chance})"
        );
        m.keep = 1.5;
        assert!(m.validate().is_err());
        m.keep = 0.5;
        m.top_k = 17;
        assert!(m.validate().is_err());
    }

    #[test]
    fn route_traces_read_and_wrap_and_bad_lines_are_named() {
        let f = file(
            "# routes\n{\"request\": 9, \"token\": 1, \"layers\": [[1, 2], [0, 3]]}\n\
             {\"request\": 9, \"token\": 0, \"layers\": [[4, 5], [6, 7]]}\n\
             {\"request\": 2, \"token\": 0, \"layers\": [[0, 1], [2, 3]]}\n",
            ".jsonl",
        );
        let t = read_route_trace(f.path()).unwrap();
        assert_eq!((t.layers, t.top_k, t.experts()), (2, 2, 8));
        assert_eq!(t.requests[0], vec![vec![0, 1, 2, 3]], "request 2 first");
        let mut out = Vec::new();
        t.token(3, 2, &mut out); // request 3 -> trace request 1 (id 9), token 2 -> token 0
        assert_eq!(out, vec![4, 5, 6, 7]);
        for (bad, needle) in [
            (
                "{\"request\": 1, \"token\": 0, \"layers\": [[1, 1], [0, 2]]}",
                "repeats",
            ),
            (
                "{\"request\": 1, \"token\": 0, \"layers\": [[1, 2]]}",
                "layers",
            ),
            (
                "{\"request\": 1, \"token\": 0, \"layers\": [[1], [2]]}",
                "expected 2",
            ),
            (
                "{\"request\": 1, \"token\": 3, \"layers\": [[1, 2], [0, 2]]}",
                "token 3",
            ),
            (
                "{\"request\": 1, \"token\": 0, \"layers\": [[1, 999], [0, 2]]}",
                "too large",
            ),
            (
                "{\"request\": 1, \"token\": 0, \"layers\": []}",
                "at least one",
            ),
            (
                "{\"request\": 1, \"tok\": 0, \"layers\": [[1, 2], [0, 2]]}",
                "unknown field",
            ),
        ] {
            let f = file(
                &format!("{{\"request\": 0, \"token\": 0, \"layers\": [[1, 2], [0, 3]]}}\n{bad}\n"),
                ".jsonl",
            );
            let err = read_route_trace(f.path()).unwrap_err().to_string();
            assert!(err.contains(":2:") && err.contains(needle), "{bad}: {err}");
        }
        let empty = file("# nothing\n", ".jsonl");
        assert!(read_route_trace(empty.path()).is_err());
    }

    #[test]
    fn expert_model_keeps_the_previous_expert_at_the_papers_rate() {
        let m = ExpertModel::read_me(7, 3);
        let pop = m.popularity();
        assert!((pop.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let (mut kept, mut total) = (0usize, 0usize);
        for r in 0..400 {
            let mut s = m.stream(&pop, r);
            let mut prev = s.next_expert();
            for _ in 0..256 {
                let e = s.next_expert();
                assert!((e as usize) < 7);
                kept += (e == prev) as usize;
                total += 1;
                prev = e;
            }
        }
        let share = kept as f64 / total as f64;
        assert!((share - READ_ME_KEEP).abs() < 0.02, "{share}");
    }
}
