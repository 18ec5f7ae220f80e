//! The reference fixtures under `tests/fixtures/<name>/`: a model directory and
//! `expected.safetensors` with three cases of prompt, greedy output, logits and experts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use pregate::engine::{Engine, GenerationRequest};
use pregate::route::TokenRoute;
use safetensors::SafeTensors;

/// One case of a fixture.
pub struct Case {
    /// The prompt ids.
    pub prompt: Vec<u32>,
    /// The greedy output ids (EOS ignored).
    pub output: Vec<u32>,
    /// `[output.len(), V]`: row 0 after the prompt, row i after feeding output token i-1.
    pub logits: Vec<f32>,
    /// `[layers, T, k]` (Read-ME: one layer row for all): every fed token's experts, -1 rows for
    /// dense layers.
    pub experts: Vec<i64>,
    /// The weights of `experts`, same shape.
    pub weights: Vec<f32>,
    /// Layer rows of `experts` (1 for Read-ME's `[T, k]`).
    pub layers: usize,
    /// Experts per token.
    pub k: usize,
}

impl Case {
    /// Token `t`'s experts at `layer`.
    pub fn experts_at(&self, layer: usize, t: usize) -> &[i64] {
        let rows = self.experts.len() / (self.layers * self.k);
        let at = (layer * rows + t) * self.k;
        &self.experts[at..at + self.k]
    }

    /// Token `t`'s weights at `layer`.
    pub fn weights_at(&self, layer: usize, t: usize) -> &[f32] {
        let rows = self.weights.len() / (self.layers * self.k);
        let at = (layer * rows + t) * self.k;
        &self.weights[at..at + self.k]
    }

    /// Fed tokens with experts: the prompt and every output token but the last.
    pub fn fed(&self) -> usize {
        self.experts.len() / (self.layers * self.k)
    }
}

/// `tests/fixtures/<name>`: beside the sources, or under the working directory (a prebuilt test
/// binary run from the repository root on another machine).
pub fn fixture_dir(name: &str) -> PathBuf {
    let built = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name);
    if built.exists() {
        built
    } else {
        Path::new("tests/fixtures").join(name)
    }
}

/// The three cases of fixture `name`.
pub fn read_cases(name: &str) -> Vec<Case> {
    let bytes = std::fs::read(fixture_dir(name).join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let i64s = |n: &str| -> Vec<i64> {
        st.tensor(n)
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let f32s = |n: &str| -> Vec<f32> {
        st.tensor(n)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let ids = |n: &str| -> Vec<u32> { i64s(n).into_iter().map(|v| v as u32).collect() };
    (0..3)
        .map(|c| {
            let shape = st
                .tensor(&format!("case{c}.experts"))
                .unwrap()
                .shape()
                .to_vec();
            Case {
                prompt: ids(&format!("case{c}.prompt_ids")),
                output: ids(&format!("case{c}.output_ids")),
                logits: f32s(&format!("case{c}.logits")),
                experts: i64s(&format!("case{c}.experts")),
                weights: f32s(&format!("case{c}.expert_weights")),
                layers: if shape.len() == 3 { shape[0] } else { 1 },
                k: *shape.last().unwrap(),
            }
        })
        .collect()
}

/// The greedy request of a case, EOS ignored, every step's logits kept.
pub fn request(case: &Case) -> GenerationRequest {
    let mut r = GenerationRequest::greedy(case.prompt.clone(), case.output.len());
    r.ignore_eos = true;
    r.keep_logits = true;
    r
}

/// The greedy tokens equal the reference's, and every logit is within `tol` times the largest
/// reference logit's magnitude.
pub fn check_tokens_and_logits(name: &str, case: &Case, output: &[u32], logits: &[f32], tol: f32) {
    assert_eq!(output, case.output, "{name}: greedy tokens");
    assert_eq!(logits.len(), case.logits.len(), "{name}: logits");
    let scale = case.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    let max_diff = logits
        .iter()
        .zip(&case.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        max_diff <= tol * scale,
        "{name}: max |logit diff| {max_diff} vs scale {scale}"
    );
}

/// What an engine produced for one case: tokens, every step's logits, and per layer the route of
/// every fed token in position order (empty for a dense layer).
#[derive(Debug)]
pub struct Run {
    /// The generated tokens.
    pub output: Vec<u32>,
    /// Every step's logits, concatenated.
    pub logits: Vec<f32>,
    /// `routes[layer][position]`: the traced route of each fed token.
    pub routes: Vec<Vec<Option<TokenRoute>>>,
}

/// Runs `cases` together in `engine` (tracing its in-model routes), `chunk` prompt tokens per
/// step at most.
pub fn run_batched(engine: &mut Engine, cases: &[Case], chunk: usize) -> Vec<Run> {
    let layers = engine.config().num_hidden_layers;
    let ids: Vec<u64> = cases
        .iter()
        .map(|c| engine.add_request(request(c)).unwrap())
        .collect();
    let mut runs: Vec<Run> = cases
        .iter()
        .map(|_| Run {
            output: vec![],
            logits: vec![],
            routes: vec![Vec::new(); layers],
        })
        .collect();
    let index: HashMap<u64, usize> = ids.iter().enumerate().map(|(i, &s)| (s, i)).collect();
    while !engine.is_empty() {
        let schedule: Vec<(u64, usize)> = engine
            .pending()
            .map(|p| (p.seq, p.tokens.len().min(chunk)))
            .collect();
        let out = engine.step(&schedule).unwrap();
        for c in &out.routes {
            let run = &mut runs[index[&c.seq]];
            for (l, routes) in c.layers.iter().enumerate() {
                let row = &mut run.routes[l];
                for (i, r) in routes.iter().enumerate() {
                    let pos = c.start_pos + i;
                    if row.len() <= pos {
                        row.resize(pos + 1, None);
                    }
                    row[pos] = Some(*r);
                }
            }
        }
        for ev in out.into_events().unwrap() {
            assert!(
                ev.route.is_none(),
                "an in-model router routes nothing ahead"
            );
            let run = &mut runs[index[&ev.seq]];
            run.output.push(ev.token);
            run.logits.extend(ev.logits.unwrap());
        }
    }
    runs
}
