//! The CPU backend: the whole backbone on the host, in f32. It is the reference every other backend
//! is checked against, and a usable backend for small models.
//!
//! The routed experts are the CPU expert runtime's ([`CpuExperts`]), called once per layer; with
//! an expert cache ([`CpuBackend::with_expert_cache`]) the runtime accounts the decisions a device
//! cache makes (see [`crate::moe`]) while the weights stay in host memory.

use std::collections::HashMap;

use rayon::prelude::*;

use super::backend::{Backend, ChunkRoutes, ForwardChunk, Lookahead, SeqId, StepRoutes};
use crate::cache::{EvictionPolicy, ExpertCache, ExpertCapacity};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::family::QkNorm;
use crate::model::weights::{LayerWeights, Matrix};
use crate::moe::speculate::{LayerScores, SpeculationStats, SpeculatorConfig};
use crate::moe::{step_experts, CpuExperts};
use crate::ops::{attention, matmul_t, rms_norm, swiglu_ffn, AttentionShape, RopeTable};
use crate::router::in_model::route_hidden;

/// One sequence's keys and values, per layer `[len, n_kv_heads * head_dim]`.
struct SeqKv {
    max_len: usize,
    width: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl SeqKv {
    fn len(&self) -> usize {
        self.k.first().map_or(0, |k| k.len() / self.width)
    }
}

/// The backbone's weights without the router (which runs outside the backend).
pub struct BackboneWeights {
    /// `[V, H]`.
    pub embed: Matrix,
    /// Decoder layers.
    pub layers: Vec<LayerWeights>,
    /// Final norm `[H]`.
    pub norm: Vec<f32>,
    /// `[V, H]`, `None` when tied to `embed`.
    pub lm_head: Option<Matrix>,
}

impl BackboneWeights {
    /// Splits a model's weights into the backbone's and the router's (the router runs outside
    /// the backend, or on the device of a backend that routes).
    pub fn split(w: crate::model::ModelWeights) -> (Self, crate::model::RouterWeights) {
        let backbone = BackboneWeights {
            embed: w.embed,
            layers: w.layers,
            norm: w.norm,
            lm_head: w.lm_head,
        };
        (backbone, w.router)
    }
}

/// How a model's own gates route (the Hugging Face MoE families).
#[derive(Debug, Clone, Copy)]
struct InModelGating {
    top_k: usize,
    renormalize: bool,
}

/// The CPU backend.
pub struct CpuBackend {
    cfg: ModelConfig,
    w: BackboneWeights,
    rope: RopeTable,
    shape: AttentionShape,
    kv: HashMap<SeqId, SeqKv>,
    experts: CpuExperts,
    /// Each decoder layer's index in the expert runtime; `None` for a dense layer.
    moe_index: Vec<Option<usize>>,
    /// Set when every MoE layer routes its own hidden state.
    in_model: Option<InModelGating>,
    clip_qkv: Option<f32>,
    /// The routes of the last forward pass, when tracing.
    trace: Option<Vec<ChunkRoutes>>,
}

impl CpuBackend {
    /// A backend over `weights` for `cfg`; the layers' experts move into the expert runtime.
    /// A layer with routed experts is an MoE layer (routed by its own gate when it has one, else by
    /// the chunks' routes); a layer without is dense and must carry its MLP.
    pub fn new(cfg: ModelConfig, mut weights: BackboneWeights) -> Result<Self> {
        let d = cfg.head_dim();
        let shape = AttentionShape {
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_kv_heads(),
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
            window: cfg.sliding_window(),
        };
        check_layer_extras(&cfg, &weights)?;
        let rope = RopeTable::new(d, cfg.rope_theta, cfg.max_position_embeddings);
        let mut moe_index = Vec::with_capacity(weights.layers.len());
        let (mut routed, mut shared, mut gates) = (Vec::new(), Vec::new(), Vec::new());
        for layer in weights.layers.iter_mut() {
            if layer.experts.is_empty() {
                moe_index.push(None);
                continue;
            }
            moe_index.push(Some(routed.len()));
            routed.push(std::mem::take(&mut layer.experts));
            shared.push(layer.shared.take());
            gates.push(layer.extra.shared_gate.take());
        }
        let gated = weights
            .layers
            .iter()
            .zip(&moe_index)
            .filter(|(_, m)| m.is_some())
            .map(|(l, _)| l.extra.gate.is_some() || l.extra.dselect.is_some())
            .collect::<Vec<_>>();
        let in_model = match (gated.iter().all(|&g| g), gated.iter().any(|&g| g)) {
            (true, true) => Some(InModelGating {
                top_k: cfg.experts_per_token(),
                renormalize: cfg.renormalize_top_k(),
            }),
            (_, false) => None,
            (false, true) => {
                return Err(Error::InvalidArgument(
                    "some MoE layers have an in-model gate and others not".into(),
                ))
            }
        };
        let experts = CpuExperts::new(routed, shared, cfg.hidden_size, cfg.experts_per_token())?
            .with_shared_gates(gates)?;
        Ok(CpuBackend {
            clip_qkv: cfg.clip_qkv(),
            cfg,
            w: weights,
            rope,
            shape,
            kv: HashMap::new(),
            experts,
            moe_index,
            in_model,
            trace: None,
        })
    }

    /// Adds an expert cache of `capacity` evicting by `policy` (accounting of a device cache's
    /// decisions, see [`crate::moe`]; the weights stay in host memory).
    pub fn with_expert_cache(
        mut self,
        capacity: ExpertCapacity,
        policy: EvictionPolicy,
    ) -> Result<Self> {
        self.experts = self.experts.with_cache(capacity, policy)?;
        Ok(self)
    }

    /// Speculative expert prefetch for an in-model router ([`crate::moe::Speculator`]) of
    /// `cfg`'s depth and extra candidates, on or off as `on` says; `None` takes the default: on
    /// when the model routes in-model and the expert cache holds fewer units than the model has
    /// experts, else off (every expert resident, or a pre-gate router whose routes are exact).
    /// Asking for it with a pre-gate router is an error. Call after
    /// [`CpuBackend::with_expert_cache`].
    pub fn with_speculation(mut self, on: Option<bool>, cfg: SpeculatorConfig) -> Result<Self> {
        let in_model = self.in_model.is_some();
        let cfg =
            super::backend::speculation_config(on, cfg, in_model, || self.speculation_pays())?;
        self.experts = self.experts.with_speculation(cfg)?;
        Ok(self)
    }

    /// Whether the default turns speculation on: an in-model router and a cache smaller than the
    /// experts.
    fn speculation_pays(&self) -> bool {
        let shape = self.experts.shape();
        let units = shape.layers * shape.experts;
        self.in_model.is_some() && self.experts.cache().is_some_and(|c| c.capacity() < units)
    }

    /// The speculator's counters, when speculating.
    pub fn speculation_stats(&self) -> Option<SpeculationStats> {
        self.experts.speculation_stats()
    }

    /// Bytes of KV cache one token takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_hidden_layers * self.shape.n_kv_heads * self.shape.head_dim * 4
    }
}

/// Checks the family tensors of every layer against the config, so that a forward pass cannot
/// meet a vector of the wrong length: q/k/v biases, QK norms (per head or full width), a dense
/// layer's MLP, an in-model gate of `[experts, H]` and a shared gate of `[H]`.
fn check_layer_extras(cfg: &ModelConfig, w: &BackboneWeights) -> Result<()> {
    let (h, d) = (cfg.hidden_size, cfg.head_dim());
    let (qd, kvd) = (cfg.num_attention_heads * d, cfg.num_kv_heads() * d);
    let bad = |l: usize, what: String| Err(Error::InvalidArgument(format!("layer {l}: {what}")));
    for (l, layer) in w.layers.iter().enumerate() {
        let x = &layer.extra;
        if let Some([bq, bk, bv]) = &x.qkv_bias {
            if (bq.len(), bk.len(), bv.len()) != (qd, kvd, kvd) {
                return bad(
                    l,
                    format!(
                        "q/k/v biases of {}, {}, {} values",
                        bq.len(),
                        bk.len(),
                        bv.len()
                    ),
                );
            }
        }
        if let Some([nq, nk]) = &x.qk_norm {
            let ok = match cfg.qk_norm() {
                QkNorm::PerHead => nq.len() == d && nk.len() == d,
                QkNorm::Full => nq.len() == qd && nk.len() == kvd,
                QkNorm::None => false,
            };
            if !ok {
                return bad(
                    l,
                    format!("q/k norms of {} and {} values", nq.len(), nk.len()),
                );
            }
        } else if cfg.qk_norm() != QkNorm::None {
            return bad(l, "the q/k norms are missing".into());
        }
        if layer.experts.is_empty() && x.dense.is_none() {
            return bad(l, "neither routed experts nor a dense MLP".into());
        }
        if let Some(g) = &x.gate {
            if (g.rows, g.cols) != (layer.experts.len(), h) {
                return bad(
                    l,
                    format!(
                        "a gate of [{}, {}] for {} experts",
                        g.rows,
                        g.cols,
                        layer.experts.len()
                    ),
                );
            }
        }
        if let Some(dense) = &x.dense {
            let i = dense.inter();
            if (
                dense.gate.cols,
                dense.up.rows,
                dense.up.cols,
                dense.down.rows,
                dense.down.cols,
            ) != (h, i, h, h, i)
            {
                return bad(l, "a dense MLP that is no FFN of the hidden width".into());
            }
        }
    }
    Ok(())
}

/// Predicted gate logits of the MoE layers after decoder layer `from` (before layer 0 when
/// `None`), up to `depth` decoder layers ahead: each layer's own post-attention RMSNorm and gate
/// applied to the residual stream `x` (`[T, H]`) as it is now. Dense layers are skipped (they
/// count in the distance). Softmax is monotone, so logits rank the experts as the gate's
/// probabilities do. Returns (runtime layer, distance, `[T, E]` logits).
fn predicted_logits(
    layers: &[LayerWeights],
    moe_index: &[Option<usize>],
    x: &[f32],
    total: usize,
    eps: f32,
    from: Option<usize>,
    depth: usize,
) -> Vec<(usize, usize, Vec<f32>)> {
    let first = from.map_or(0, |l| l + 1);
    let mut out = Vec::new();
    let mut normed = vec![0.0f32; x.len()];
    for target in first..layers.len().min(first + depth) {
        let (Some(m), Some(gate)) = (moe_index[target], &layers[target].extra.gate) else {
            continue;
        };
        rms_norm(x, &layers[target].post_norm, eps, &mut normed);
        let mut logits = vec![0.0f32; total * gate.rows];
        matmul_t(&normed, total, gate, &mut logits);
        out.push((m, target + 1 - first, logits));
    }
    out
}

/// Hands predicted logits to the expert runtime's speculator.
fn speculate(
    experts: &mut CpuExperts,
    top_k: usize,
    predicted: &[(usize, usize, Vec<f32>)],
) -> Result<()> {
    let scores: Vec<LayerScores<'_>> = predicted
        .iter()
        .map(|(layer, distance, s)| LayerScores {
            layer: *layer,
            distance: *distance,
            scores: s,
            top_k,
        })
        .collect();
    experts.speculate(&scores)
}

/// Adds `bias` to each `bias.len()`-wide row of `x`.
fn add_bias(x: &mut [f32], bias: &[f32]) {
    for row in x.chunks_exact_mut(bias.len().max(1)) {
        crate::ops::add_assign(row, bias);
    }
}

/// RMSNorm in place over rows of `w.len()` (a head, or the whole projected width).
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let input = x.to_vec();
    rms_norm(&input, w, eps, x);
}

impl Backend for CpuBackend {
    fn device_name(&self) -> String {
        "cpu".into()
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn add_sequence(&mut self, seq: SeqId, max_len: usize) -> Result<()> {
        super::check_max_len(&self.cfg, max_len)?;
        let layers = self.cfg.num_hidden_layers;
        self.kv.insert(
            seq,
            SeqKv {
                max_len,
                width: self.shape.n_kv_heads * self.shape.head_dim,
                k: vec![Vec::new(); layers],
                v: vec![Vec::new(); layers],
            },
        );
        Ok(())
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        self.kv.remove(&seq);
    }

    fn forward(&mut self, chunks: &[ForwardChunk<'_>]) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let (hdim, vocab) = (cfg.hidden_size, cfg.vocab_size);
        let kv_width = self.shape.n_kv_heads * self.shape.head_dim;
        let q_width = self.shape.n_heads * self.shape.head_dim;
        // Validate everything before touching any KV cache, so a bad chunk changes nothing.
        for c in chunks {
            let kv = self.kv.get(&c.seq).ok_or(Error::UnknownSequence(c.seq))?;
            match self.in_model {
                Some(_) => c.check_tokens(kv.len(), kv.max_len, vocab)?,
                None => c.check(kv.len(), kv.max_len, vocab)?,
            }
        }
        // Routes known ahead (a pre-gate router) are checked before any KV cache changes; an
        // in-model gate makes each layer's routes as the layer runs.
        let known = match self.in_model {
            Some(_) => None,
            None => {
                let routes = StepRoutes::of(chunks, self.w.layers.len());
                for (l, m) in self.moe_index.iter().enumerate() {
                    if let Some(m) = m {
                        self.experts.check(*m, routes.layer(l))?;
                    }
                }
                Some(routes)
            }
        };
        if let Some(trace) = self.trace.as_mut() {
            *trace = chunks
                .iter()
                .map(|c| ChunkRoutes {
                    seq: c.seq,
                    start_pos: c.start_pos,
                    layers: vec![Vec::new(); self.w.layers.len()],
                })
                .collect();
        }
        let total: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let mut x = Vec::with_capacity(total * hdim);
        for c in chunks {
            for &t in c.tokens {
                x.extend_from_slice(self.w.embed.row(t as usize));
            }
        }
        let eps = cfg.rms_norm_eps;
        // Speculation (in-model gates only): the step's embeddings predict its first layers.
        let spec = match (self.in_model, self.experts.speculation()) {
            (Some(g), Some(s)) => Some((g.top_k, s.depth)),
            _ => None,
        };
        if let Some((top_k, depth)) = spec {
            let p = predicted_logits(&self.w.layers, &self.moe_index, &x, total, eps, None, depth);
            // A prediction only saves loads: one that fails (a NaN) leaves the exact path alone.
            let _ = speculate(&mut self.experts, top_k, &p);
        }
        let mut h = vec![0.0f32; total * hdim];
        let mut q = vec![0.0f32; total * q_width];
        let mut k = vec![0.0f32; total * kv_width];
        let mut v = vec![0.0f32; total * kv_width];
        let mut att = vec![0.0f32; total * q_width];
        let mut o = vec![0.0f32; total * hdim];
        for (l, layer) in self.w.layers.iter().enumerate() {
            rms_norm(&x, &layer.input_norm, eps, &mut h);
            matmul_t(&h, total, &layer.q, &mut q);
            matmul_t(&h, total, &layer.k, &mut k);
            matmul_t(&h, total, &layer.v, &mut v);
            if let Some([bq, bk, bv]) = &layer.extra.qkv_bias {
                add_bias(&mut q, bq);
                add_bias(&mut k, bk);
                add_bias(&mut v, bv);
            }
            // Per head (a weight of head_dim) or over the full width: rows of the weight's length.
            if let Some([nq, nk]) = &layer.extra.qk_norm {
                rms_norm_in_place(&mut q, nq, eps);
                rms_norm_in_place(&mut k, nk, eps);
            }
            // OLMoE clamps after the norm, before RoPE.
            if let Some(c) = self.clip_qkv {
                for val in q.iter_mut().chain(k.iter_mut()).chain(v.iter_mut()) {
                    *val = val.clamp(-c, c);
                }
            }
            let mut row = 0;
            for c in chunks {
                for i in 0..c.tokens.len() {
                    let pos = c.start_pos + i;
                    let r = row + i;
                    self.rope.apply(&mut q[r * q_width..(r + 1) * q_width], pos);
                    self.rope
                        .apply(&mut k[r * kv_width..(r + 1) * kv_width], pos);
                }
                let n = c.tokens.len();
                let cache = self.kv.get_mut(&c.seq).expect("validated");
                cache.k[l].extend_from_slice(&k[row * kv_width..(row + n) * kv_width]);
                cache.v[l].extend_from_slice(&v[row * kv_width..(row + n) * kv_width]);
                row += n;
            }
            // Attention per sequence, sequences in parallel (each call also splits its heads).
            let (kv, shape, q_all) = (&self.kv, &self.shape, &q);
            let mut jobs = Vec::with_capacity(chunks.len());
            let (mut rest, mut r0) = (att.as_mut_slice(), 0);
            for c in chunks {
                let n = c.tokens.len();
                let (mine, tail) = rest.split_at_mut(n * q_width);
                jobs.push((c, r0, mine));
                rest = tail;
                r0 += n;
            }
            jobs.into_par_iter().for_each(|(c, r0, out)| {
                let cache = &kv[&c.seq];
                let rows = r0 * q_width..(r0 + c.tokens.len()) * q_width;
                attention(
                    &q_all[rows],
                    &cache.k[l],
                    &cache.v[l],
                    c.start_pos,
                    shape,
                    out,
                );
            });
            matmul_t(&att, total, &layer.o, &mut o);
            crate::ops::add_assign(&mut x, &o);
            // After the attention, before this layer's experts: the coming layers' gates on the
            // residual stream as it is now.
            if let Some((top_k, depth)) = spec {
                let p = predicted_logits(
                    &self.w.layers,
                    &self.moe_index,
                    &x,
                    total,
                    eps,
                    Some(l),
                    depth,
                );
                // A prediction only saves loads: one that fails (a NaN) leaves the exact path alone.
                let _ = speculate(&mut self.experts, top_k, &p);
            }
            rms_norm(&x, &layer.post_norm, eps, &mut h);
            match (self.moe_index[l], &layer.extra.dense) {
                (None, Some(dense)) => swiglu_ffn(&h, total, dense, &mut o),
                (None, None) => {
                    return Err(Error::Internal(format!(
                        "layer {l} has no feed-forward part"
                    )))
                }
                (Some(m), _) => {
                    let made;
                    let x = &layer.extra;
                    let routes = match (&known, self.in_model, &x.gate, &x.dselect) {
                        (Some(known), _, _, _) => known.layer(l),
                        (None, Some(g), Some(gate), _) => {
                            made = route_hidden(&h, gate, g.top_k, g.renormalize)?;
                            &made[..]
                        }
                        // DSelect-k's per-example gate: one route per token's normed hidden state.
                        (None, Some(g), None, Some(gate)) => {
                            made = h
                                .chunks_exact(hdim)
                                .map(|row| gate.route_at_most(Some(row), g.top_k))
                                .collect::<Result<Vec<_>>>()?;
                            &made[..]
                        }
                        _ => return Err(Error::Internal(format!("layer {l} has no routes"))),
                    };
                    if let Some(trace) = self.trace.as_mut() {
                        let mut at = 0;
                        for (entry, c) in trace.iter_mut().zip(chunks) {
                            let n = c.tokens.len();
                            entry.layers[l] = routes[at..at + n].to_vec();
                            at += n;
                        }
                    }
                    self.experts.forward_layer(m, &h, routes, &mut o, false)?;
                }
            }
            crate::ops::add_assign(&mut x, &o);
        }
        self.experts.end_step();
        // Final norm and lm_head only for the last token of chunks that want logits.
        let mut last = Vec::new();
        let mut row = 0;
        for c in chunks {
            row += c.tokens.len();
            if c.want_logits {
                last.extend_from_slice(&x[(row - 1) * hdim..row * hdim]);
            }
        }
        let m = last.len() / hdim;
        let mut normed = vec![0.0f32; last.len()];
        rms_norm(&last, &self.w.norm, eps, &mut normed);
        let head = self.w.lm_head.as_ref().unwrap_or(&self.w.embed);
        let mut logits = vec![0.0f32; m * vocab];
        matmul_t(&normed, m, head, &mut logits);
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    fn prepare(&mut self, lookahead: &Lookahead) -> Result<()> {
        let layers = self.experts.shape().layers;
        self.experts.plan(&step_experts(&lookahead.steps, layers))
    }

    fn expert_cache(&self) -> Option<&ExpertCache> {
        self.experts.cache()
    }

    fn speculation_stats(&self) -> Option<SpeculationStats> {
        self.experts.speculation_stats()
    }

    fn trace_routes(&mut self, on: bool) -> Result<()> {
        self.trace = super::backend::route_trace(on, self.in_model.is_some())?;
        Ok(())
    }

    fn take_route_trace(&mut self) -> Vec<ChunkRoutes> {
        self.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{make_model, ExpertLayout, ModelDir, Preset};
    use crate::route::RoutePlan;

    fn tiny_backend(per_layer: usize) -> (tempfile::TempDir, CpuBackend) {
        let dir = tempfile::tempdir().unwrap();
        make_model(&Preset::Tiny.spec(), ExpertLayout::Fused, 0, dir.path()).unwrap();
        let m = ModelDir::open(dir.path()).unwrap();
        let (backbone, _) = BackboneWeights::split(m.load_weights().unwrap());
        let b = CpuBackend::new(m.config.clone(), backbone)
            .unwrap()
            .with_expert_cache(ExpertCapacity::PerLayer(per_layer), EvictionPolicy::Belady)
            .unwrap();
        (dir, b)
    }

    fn run(b: &mut CpuBackend, seq: SeqId, tokens: &[u32], routes: &RoutePlan, at: usize) {
        let chunk = ForwardChunk {
            seq,
            tokens,
            start_pos: at,
            routes,
            route_offset: at,
            want_logits: true,
        };
        b.forward(&[chunk]).unwrap();
    }

    #[test]
    fn the_cache_accounts_hits_misses_and_belady_evictions() {
        let (_d, mut b) = tiny_backend(2);
        let layers = b.config().num_hidden_layers as u64;
        let routes = RoutePlan::from_top1(4, &[0, 1, 2, 0, 1]);
        b.add_sequence(1, 8).unwrap();
        // Step 1 uses experts 0, 1 and 2 at every layer with 2 slots per layer: two waves.
        run(&mut b, 1, &[5, 6, 7], &routes, 0);
        let c = b.expert_cache().unwrap();
        assert_eq!(c.stats().misses, 3 * layers);
        assert_eq!(c.stats().evictions, layers);
        assert_eq!(c.stats().bytes_loaded, 3 * layers * c.unit_bytes());
        assert_eq!(c.resident(), 2 * layers as usize);
        // Resident: 1 and 2 (0 was the least recently used). The lookahead says 0 now, then 1:
        // Belady evicts 2 (never used again), where LRU would evict 1.
        let next = Lookahead {
            steps: vec![routes.slice(3..4), routes.slice(4..5)],
        };
        b.prepare(&next).unwrap();
        run(&mut b, 1, &[8], &routes, 3);
        let resident = b.expert_cache().unwrap().resident_in_every_layer();
        assert!(resident.contains(0) && resident.contains(1) && !resident.contains(2));
        b.prepare(&Lookahead {
            steps: vec![routes.slice(4..5)],
        })
        .unwrap();
        run(&mut b, 1, &[9], &routes, 4);
        let s = b.expert_cache().unwrap().stats();
        assert_eq!(s.hits + s.misses, 5 * layers);
        // Nothing is pinned after a step.
        assert!((0..4).all(|e| !b
            .expert_cache()
            .unwrap()
            .is_pinned(crate::cache::Unit::new(0, e))));
    }

    #[test]
    fn the_cache_changes_no_logits() {
        let (_d, mut cached) = tiny_backend(1);
        let dir = tempfile::tempdir().unwrap();
        make_model(&Preset::Tiny.spec(), ExpertLayout::Fused, 0, dir.path()).unwrap();
        let m = ModelDir::open(dir.path()).unwrap();
        let (backbone, _) = BackboneWeights::split(m.load_weights().unwrap());
        let mut plain = CpuBackend::new(m.config.clone(), backbone).unwrap();
        let routes = RoutePlan::from_top1(4, &[3, 1, 2, 0]);
        for b in [&mut cached, &mut plain] {
            b.add_sequence(7, 4).unwrap();
        }
        let chunk = ForwardChunk {
            seq: 7,
            tokens: &[1, 2, 3, 4],
            start_pos: 0,
            routes: &routes,
            route_offset: 0,
            want_logits: true,
        };
        let a = cached.forward(&[chunk]).unwrap();
        let b = plain.forward(&[chunk]).unwrap();
        assert_eq!(a, b);
        assert!(plain.expert_cache().is_none());
        assert_eq!(cached.expert_cache().unwrap().stats().misses, 4 * 2);
    }

    /// A family fixture whose residual stream never changes after the embedding (every
    /// attention output and every FFN output zero) and whose layers have distinct norms: layer
    /// `l+j`'s own norm and gate applied to the stream after layer `l` then give exactly layer
    /// `l+j`'s routes, so recall is 1 at every distance with no extra candidate.
    #[test]
    fn predictions_use_the_predicted_layers_own_norm_and_gate() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/olmoe_f32/model");
        let m = ModelDir::open(&dir).unwrap();
        let (mut backbone, _) = m.load_backbone().unwrap();
        for (l, layer) in backbone.layers.iter_mut().enumerate() {
            layer.o.data.fill(0.0);
            for e in layer.experts.iter_mut().chain(layer.shared.as_mut()) {
                e.down.data.fill(0.0);
            }
            for (i, w) in layer.post_norm.iter_mut().enumerate() {
                *w = 1.0 + ((i * 7 + l * 13) % 11) as f32 / 3.0;
            }
        }
        assert_ne!(backbone.layers[0].post_norm, backbone.layers[1].post_norm);
        let cfg = SpeculatorConfig {
            depth: 2,
            extra: 0,
            enabled: true,
        };
        let mut b = CpuBackend::new(m.config.clone(), backbone)
            .unwrap()
            .with_expert_cache(ExpertCapacity::PerLayer(2), EvictionPolicy::BeladyDecay)
            .unwrap()
            .with_speculation(None, cfg)
            .unwrap();
        let none = RoutePlan::new(m.config.num_experts(), crate::route::RouteScope::AllLayers);
        b.add_sequence(1, 16).unwrap();
        run(&mut b, 1, &[5, 6, 7, 8], &none, 0);
        run(&mut b, 1, &[9], &none, 4);
        let s = b.speculation_stats().unwrap();
        assert!(s.hits[0] > 0 && s.hits[1] > 0, "{s:?}");
        assert_eq!(s.recall(1), Some(1.0), "{s:?}");
        assert_eq!(s.recall(2), Some(1.0), "{s:?}");
    }

    #[test]
    fn speculation_needs_an_in_model_router() {
        let (_d, b) = tiny_backend(2);
        let on = SpeculatorConfig::default();
        assert!(b.with_speculation(Some(true), on).is_err());
        let (_d, b) = tiny_backend(2);
        let b = b.with_speculation(None, on).unwrap();
        assert!(
            b.speculation_stats().is_none(),
            "a pre-gate router's routes are exact"
        );
    }
}
