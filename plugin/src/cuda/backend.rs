//! The CUDA backend: the backbone of one model on one device (see the module docs of
//! [`crate::cuda`]); its routed experts are the expert runtime's ([`CudaExperts`]).
//!
//! The Hugging Face MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) add, per layer: q/k/v
//! biases, QK RMSNorm per head or over the full width, `clip_qkv`, dense FFN layers between MoE
//! layers, a sigmoid-gated shared expert (the runtime's), and the in-model gate. The gate runs on
//! the device (GEMM on the post-attention-normed hidden state, softmax top-k kernel); its small
//! id and weight arrays are read back to the host, because the expert runtime plans its waves
//! and cache lookups from host routes: one host synchronisation per MoE layer per step.
//!
//! Speculative prefetch ([`CudaBackend::with_speculation`]): at an MoE layer, after its
//! attention, the next `D` decoder layers' own post-attention norms and gates are applied to the
//! residual stream on the device, and their logits `[D, tokens, E]` land in the same buffer as
//! the layer's exact ids and weights, so that one copy and the layer's one synchronisation bring
//! back both. The exact experts are looked up and their misses issued first, then the
//! predictions go to [`CudaExperts::speculate`], whose copies queue behind them on the copy
//! stream while the layer's experts compute. Before layer 0 the step's embeddings predict its
//! first layers the same way, at the cost of one more synchronisation per step (the copies then
//! overlap layer 0's attention), and a dense layer (Qwen2-MoE's `mlp_only_layers`) predicts
//! with one synchronisation of its own (the copies overlap its MLP).

/// Why a DSelect-k model cannot be opened here.
const DSELECT_ON_CPU: &str = "DSelect-k gates (pregate_gate) are served by the CPU backend only";

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream};
use pregate_kernels::{
    AttentionShape, Blas, ExpertPlan, ExpertWeights, FfnDims, KernelSet, PagedKvLayout,
};

use super::experts::{CudaExperts, CudaSpeculation, ExpertSetup, LinkModel};
use super::kv::PagedKv;
use super::weights::{upload, upload_concat, upload_stacked, DeviceElem};
use super::{dev, CacheSetup, CudaHandle, CudaOptions};
use crate::cache::ExpertCache;
use crate::config::ModelConfig;
use crate::engine::{Backend, ChunkRoutes, ForwardChunk, Lookahead, SeqId, StepRoutes};
use crate::error::{Error, Result};
use crate::model::family::{AttnProj, FfnPlan, FfnProj, GatingRule, TensorRole};
use crate::model::{ExpertLayout, ModelDir};
use crate::moe::speculate::{LayerScores, SpeculationStats, SpeculatorConfig};
use crate::moe::step_experts;
use crate::route::{ExpertSet, TokenRoute};

/// Per-layer dense weights.
struct LayerWeights<T> {
    input_norm: CudaSlice<T>,
    /// q, k, v rows stacked: `[(nH + 2 nKV) d, H]`.
    qkv: CudaSlice<T>,
    /// q, k, v biases stacked: `[(nH + 2 nKV) d]` (Qwen2-MoE).
    qkv_bias: Option<CudaSlice<T>>,
    /// Query and key RMSNorm weights: `[d]` each per head, `[nH d]` and `[nKV d]` over the full
    /// width (a weight's length is the width normalised).
    qk_norm: Option<(CudaSlice<T>, CudaSlice<T>)>,
    o: CudaSlice<T>,
    post_norm: CudaSlice<T>,
    ffn: LayerFfn<T>,
}

/// A layer's feed-forward part.
enum LayerFfn<T> {
    /// Layer `index` of the expert runtime, routed by the chunks' routes (a pre-gate router) or,
    /// with a `gate` `[E, H]`, by its own softmax top-k gate.
    Moe {
        index: usize,
        gate: Option<CudaSlice<T>>,
    },
    /// One SwiGLU MLP: `gate_up` `[2I, H]` (gate rows, then up rows), `down` `[H, I]`.
    Dense {
        gate_up: CudaSlice<T>,
        down: CudaSlice<T>,
        inter: usize,
    },
}

/// How the in-model gates route.
#[derive(Debug, Clone, Copy)]
struct InModelGating {
    experts: usize,
    top_k: usize,
    renormalize: bool,
}

/// Step buffers, grown to the largest step seen.
struct Workspace<T> {
    tokens: usize,
    logit_rows: usize,
    x: CudaSlice<T>,
    h: CudaSlice<T>,
    qkv: CudaSlice<T>,
    att: CudaSlice<T>,
    o: CudaSlice<T>,
    ids: CudaSlice<u32>,
    ints: CudaSlice<i32>,
    last: CudaSlice<T>,
    normed: CudaSlice<T>,
    logits: CudaSlice<f32>,
    /// In-model gate logits `[tokens, E]`.
    gate_logits: CudaSlice<f32>,
    /// What an in-model MoE layer reads back in one copy, for its `n` tokens: the chosen weights
    /// `[n, k]`, the chosen ids `[n, k]` (i32 bits), then the predicted logits `[D, n, E]`.
    readback: CudaSlice<f32>,
    /// A dense layer's `[tokens, 2I]` and `[tokens, I]` intermediates.
    ffn_gate_up: CudaSlice<T>,
    ffn_act: CudaSlice<T>,
}

/// The CUDA backend over storage type `T` (`bf16` or `f32`).
pub struct CudaBackend<T: DeviceElem> {
    cfg: ModelConfig,
    device: String,
    stream: Arc<CudaStream>,
    kernels: Arc<KernelSet>,
    blas: Blas,
    embed: CudaSlice<T>,
    lm_head: Option<CudaSlice<T>>,
    norm: CudaSlice<T>,
    layers: Vec<LayerWeights<T>>,
    experts: CudaExperts<T>,
    kv: PagedKv<T>,
    ws: Option<Workspace<T>>,
    stats: Arc<CudaHandle>,
    /// Set when every MoE layer routes its own hidden state.
    in_model: Option<InModelGating>,
    clip_qkv: Option<f32>,
    /// The widest dense layer's intermediate width (0: none).
    dense_inter: usize,
    /// The routes of the last forward pass, when tracing.
    trace: Option<Vec<ChunkRoutes>>,
    /// Speculative prefetch, when on.
    speculation: Option<CudaSpeculation>,
    /// What was asked for: on, off or the default, and the depth and extra candidates.
    spec_request: (Option<bool>, SpeculatorConfig),
    /// The copy link's measured bandwidth (bytes per second), once measured.
    link_bytes_per_s: Option<f64>,
}

impl<T: DeviceElem> CudaBackend<T> {
    /// Loads `model` onto device `opts.ordinal`.
    pub fn new(model: &ModelDir, opts: &CudaOptions) -> Result<Self> {
        let cfg = model.config.clone();
        if model.layout == ExpertLayout::Masked {
            return Err(crate::model::load::masked_layout_error(&model.dir));
        }
        let ctx = super::open_context(opts.ordinal)?;
        let stream = ctx.new_stream().map_err(dev)?;
        let kernels = Arc::new(KernelSet::new(&ctx).map_err(dev)?);
        let blas = Blas::new(&stream).map_err(dev)?;
        let ck = &model.checkpoint;
        let h = cfg.hidden_size;
        let d = cfg.head_dim();
        let kvd = cfg.num_kv_heads() * d;
        let qd = cfg.num_attention_heads * d;
        // Every tensor by its role in the model's inventory (names and shapes listed once).
        let inventory = model.plan.inventory();
        let one = |role| -> Result<CudaSlice<T>> {
            let t = inventory.require(role)?;
            upload::<T>(&stream, ck, &t.name, &t.shape)
        };
        let embed = one(TensorRole::Embedding)?;
        let lm_head = match inventory.get(TensorRole::LmHead) {
            Some(_) => Some(one(TensorRole::LmHead)?),
            None => None,
        };
        let norm = one(TensorRole::FinalNorm)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let (mut moe_layers, mut gated, mut dense_inter) = (0usize, 0usize, 0usize);
        let mut gating = None;
        for layer in 0..cfg.num_hidden_layers {
            let attn = |proj| inventory.require(TensorRole::Attention { layer, proj });
            let [q, k, vv] = [attn(AttnProj::Q)?, attn(AttnProj::K)?, attn(AttnProj::V)?];
            let rows = |t: &crate::model::family::TensorSpec| t.shape[0];
            let qkv = [
                (&*q.name, rows(q)),
                (&*k.name, rows(k)),
                (&*vv.name, rows(vv)),
            ];
            let bias = |proj| inventory.require(TensorRole::AttentionBias { layer, proj });
            let qkv_bias = match inventory.get(TensorRole::AttentionBias {
                layer,
                proj: AttnProj::Q,
            }) {
                Some(bq) => Some(upload_concat::<T>(
                    &stream,
                    ck,
                    &[bq, bias(AttnProj::K)?, bias(AttnProj::V)?],
                )?),
                None => None,
            };
            let qk_norm = match inventory.get(TensorRole::QueryNorm { layer }) {
                Some(_) => Some((
                    one(TensorRole::QueryNorm { layer })?,
                    one(TensorRole::KeyNorm { layer })?,
                )),
                None => None,
            };
            if let Some((nq, nk)) = &qk_norm {
                // Either width must tile its projection exactly, or a norm would straddle heads.
                let (wq, wk) = (nq.len(), nk.len());
                if wq == 0 || wk == 0 || qd % wq != 0 || kvd % wk != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "layer {layer}: q/k norms of {wq} and {wk} values for projections of \
                         {qd} and {kvd}"
                    )));
                }
            }
            let plan = model
                .plan
                .layer(layer)
                .ok_or_else(|| Error::Internal(format!("no plan for layer {layer}")))?;
            let ffn = match plan.ffn {
                FfnPlan::Dense { inter } => {
                    let mlp = |proj| inventory.require(TensorRole::DenseMlp { layer, proj });
                    let [g, u, dn] = [mlp(FfnProj::Gate)?, mlp(FfnProj::Up)?, mlp(FfnProj::Down)?];
                    dense_inter = dense_inter.max(inter);
                    LayerFfn::Dense {
                        gate_up: upload_stacked::<T>(
                            &stream,
                            ck,
                            &[(&*g.name, inter), (&*u.name, inter)],
                            h,
                        )?,
                        down: upload::<T>(&stream, ck, &dn.name, &dn.shape)?,
                        inter,
                    }
                }
                FfnPlan::Moe(m) => {
                    let index = moe_layers;
                    moe_layers += 1;
                    let gate = match m.gating {
                        GatingRule::PreGate => None,
                        GatingRule::SoftmaxTopK { renormalize } => {
                            gated += 1;
                            gating = Some(InModelGating {
                                experts: m.experts,
                                top_k: m.top_k,
                                renormalize,
                            });
                            Some(one(TensorRole::Gate { layer })?)
                        }
                        // `engine::device` keeps these models on the CPU; a direct caller is told.
                        GatingRule::DSelect(_) => return Err(Error::Device(DSELECT_ON_CPU.into())),
                    };
                    LayerFfn::Moe { index, gate }
                }
            };
            layers.push(LayerWeights {
                input_norm: one(TensorRole::InputNorm { layer })?,
                qkv: upload_stacked::<T>(&stream, ck, &qkv, h)?,
                qkv_bias,
                qk_norm,
                o: one(TensorRole::Attention {
                    layer,
                    proj: AttnProj::O,
                })?,
                post_norm: one(TensorRole::PostAttentionNorm { layer })?,
                ffn,
            });
        }
        let in_model = match gated {
            0 => None,
            g if g == moe_layers => gating,
            _ => {
                return Err(Error::InvalidArgument(
                    "some MoE layers have an in-model gate and others not".into(),
                ))
            }
        };
        let setup = ExpertSetup {
            capacity: opts.experts,
            policy: opts.policy,
            prefetch: opts.prefetch,
            measure_stalls: opts.measure_stalls,
            grouped_ffn: opts.grouped_ffn,
        };
        let experts = CudaExperts::new(model, kernels.clone(), &stream, setup)?;
        stream.synchronize().map_err(dev)?;
        // KV cache: what the user asked for, else a quarter of what is left.
        let nl = cfg.num_hidden_layers;
        let per_token = 2 * nl * kvd * std::mem::size_of::<T>();
        let bs = opts.kv_block_size.max(1);
        let tokens = match opts.kv_tokens {
            Some(t) => t,
            None => {
                let (free, _) = ctx.mem_get_info().map_err(dev)?;
                (free / 4 / per_token.max(1)).clamp(bs, 1 << 20)
            }
        };
        let layout = PagedKvLayout {
            num_blocks: tokens.div_ceil(bs).max(1),
            block_size: bs,
            n_kv_heads: cfg.num_kv_heads(),
            head_dim: d,
        };
        let kv = PagedKv::new(&stream, nl, layout)?;
        Ok(CudaBackend {
            device: format!("cuda:{}", opts.ordinal),
            cfg,
            stream,
            kernels,
            blas,
            embed,
            lm_head,
            norm,
            layers,
            experts,
            kv,
            ws: None,
            stats: Arc::new(CudaHandle::default()),
            in_model,
            clip_qkv: model.config.clip_qkv(),
            dense_inter,
            trace: None,
            speculation: None,
            spec_request: (Some(false), SpeculatorConfig::default()),
            link_bytes_per_s: None,
        })
    }

    /// Speculative expert prefetch for in-model gates ([`crate::moe::Speculator`]) of `cfg`'s
    /// depth and extra candidates, on or off as `on` says; `None` takes the default: on when the
    /// model routes in-model and the expert cache holds fewer units than the model has experts,
    /// else off (every expert resident, or a pre-gate router whose routes are exact). Asking for
    /// it with a pre-gate router is an error. See the module documentation for where the
    /// predictions are computed.
    pub fn with_speculation(mut self, on: Option<bool>, cfg: SpeculatorConfig) -> Result<Self> {
        self.set_speculation(on, cfg)?;
        Ok(self)
    }

    fn set_speculation(&mut self, on: Option<bool>, cfg: SpeculatorConfig) -> Result<()> {
        let in_model = self.in_model.is_some();
        let cfg = crate::engine::speculation_config(on, cfg, in_model, || self.speculation_pays())?;
        // Enabled only with an in-model gate (checked above).
        let gating = self.in_model.filter(|_| cfg.enabled);
        self.speculation = match gating {
            None => None,
            Some(g) => {
                let bytes_per_s = match self.link_bytes_per_s {
                    Some(b) => Some(b),
                    None => self.experts.measure_link()?,
                };
                self.link_bytes_per_s = bytes_per_s;
                let shape = self.experts.shape();
                let link = LinkModel {
                    // All resident: nothing is copied, the predictions only count recall.
                    bytes_per_s: bytes_per_s.unwrap_or(1e12),
                    unit_bytes: self.experts.unit_bytes(),
                    layer_seconds: None,
                    top_k: g.top_k,
                };
                Some(CudaSpeculation::new(
                    cfg,
                    shape.layers,
                    shape.experts,
                    link,
                )?)
            }
        };
        self.spec_request = (on, cfg);
        Ok(())
    }

    /// Whether the default turns speculation on: an in-model router and a cache smaller than the
    /// experts.
    fn speculation_pays(&self) -> bool {
        let shape = self.experts.shape();
        self.in_model.is_some() && self.experts.cache().capacity() < shape.layers * shape.experts
    }

    /// The speculator's counters, when speculating.
    pub fn speculation_stats(&self) -> Option<SpeculationStats> {
        self.speculation.as_ref().map(CudaSpeculation::stats)
    }

    /// Values per token of the step's readback buffer: ids and weights, and the predictions.
    fn readback_width(&self) -> usize {
        let depth = self.speculation.as_ref().map_or(0, |s| s.config().depth);
        self.in_model.map_or(0, |g| 2 * g.top_k + depth * g.experts)
    }

    /// The backend's handle (counters, cache reconfiguration).
    pub fn stats(&self) -> Arc<CudaHandle> {
        self.stats.clone()
    }

    /// The compute stream (the device router and tests order work against it).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The compiled kernels, shared with the expert runtime and a device router.
    pub fn kernels(&self) -> &Arc<KernelSet> {
        &self.kernels
    }

    /// Applies a pending [`CudaHandle::reconfigure`]: a new, empty expert cache.
    fn apply_reconfigure(&mut self) -> Result<()> {
        let switch = self.stats.speculate.lock().ok().and_then(|mut s| s.take());
        let setup = self
            .stats
            .reconfigure
            .lock()
            .ok()
            .and_then(|mut r| r.take());
        if let Some(setup) = setup {
            self.reconfigure_cache(setup)?;
        }
        if setup.is_some() || switch.is_some() {
            // Fresh counters; the default follows the new cache.
            let on = switch.unwrap_or(self.spec_request.0);
            self.set_speculation(on, self.spec_request.1)?;
        }
        Ok(())
    }

    fn reconfigure_cache(&mut self, setup: CacheSetup) -> Result<()> {
        let CacheSetup {
            experts: capacity,
            policy,
            prefetch,
        } = setup;
        let setup = ExpertSetup {
            capacity,
            policy,
            prefetch,
            ..self.experts.setup()
        };
        self.experts.reconfigure(setup, &self.stream)
    }

    /// KV cache capacity in tokens.
    pub fn kv_capacity_tokens(&self) -> usize {
        self.kv.capacity_tokens()
    }

    /// Expert cache slots.
    pub fn expert_slots(&self) -> usize {
        self.experts.cache().capacity()
    }

    fn ensure_workspace(&mut self, tokens: usize, logit_rows: usize) -> Result<()> {
        let width = self.readback_width();
        if let Some(ws) = &self.ws {
            let fits = ws.readback.len() >= ws.tokens * width;
            if ws.tokens >= tokens && ws.logit_rows >= logit_rows && fits {
                return Ok(());
            }
        }
        let tokens = tokens.max(self.ws.as_ref().map_or(0, |w| w.tokens)).max(16);
        let logit_rows = logit_rows
            .max(self.ws.as_ref().map_or(0, |w| w.logit_rows))
            .max(1);
        self.ws = None;
        self.stream.synchronize().map_err(dev)?;
        let cfg = &self.cfg;
        let d = cfg.head_dim();
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let qkv_w = (cfg.num_attention_heads + 2 * cfg.num_kv_heads()) * d;
        let qd = cfg.num_attention_heads * d;
        let s = &self.stream;
        let alloc = |n: usize| -> Result<CudaSlice<T>> {
            s.alloc_zeros::<T>(n.max(1))
                .map_err(|e| Error::Capacity(format!("step workspace of {n} elements: {e}")))
        };
        let max_blocks_total = self.kv.layout.num_blocks + tokens;
        let gate_experts = self.in_model.map_or(0, |g| g.experts);
        self.ws = Some(Workspace {
            tokens,
            logit_rows,
            x: alloc(tokens * h)?,
            h: alloc(tokens * h)?,
            qkv: alloc(tokens * qkv_w)?,
            att: alloc(tokens * qd)?,
            o: alloc(tokens * h)?,
            ids: s.alloc_zeros::<u32>(tokens + logit_rows).map_err(dev)?,
            ints: s
                .alloc_zeros::<i32>(3 * tokens + max_blocks_total)
                .map_err(dev)?,
            last: alloc(logit_rows * h)?,
            normed: alloc(logit_rows * h)?,
            logits: s.alloc_zeros::<f32>(logit_rows * v).map_err(dev)?,
            gate_logits: s
                .alloc_zeros::<f32>((tokens * gate_experts).max(1))
                .map_err(dev)?,
            readback: s.alloc_zeros::<f32>((tokens * width).max(1)).map_err(dev)?,
            ffn_gate_up: alloc(tokens * 2 * self.dense_inter)?,
            ffn_act: alloc(tokens * self.dense_inter)?,
        });
        Ok(())
    }

    fn validate(&self, chunks: &[ForwardChunk<'_>]) -> Result<()> {
        let vocab = self.cfg.vocab_size;
        for c in chunks {
            let kv = self
                .kv
                .seqs
                .get(&c.seq)
                .ok_or(Error::UnknownSequence(c.seq))?;
            match self.in_model {
                Some(_) => c.check_tokens(kv.len, kv.max_len, vocab)?,
                None => c.check(kv.len, kv.max_len, vocab)?,
            }
        }
        Ok(())
    }

    fn run(&mut self, chunks: &[ForwardChunk<'_>]) -> Result<Vec<Vec<f32>>> {
        self.validate(chunks)?;
        let n: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let m = chunks.iter().filter(|c| c.want_logits).count();
        if n == 0 {
            return Ok(Vec::new());
        }
        self.ensure_workspace(n, m)?;
        let cfg = self.cfg.clone();
        let (h, vocab, nl) = (cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers);
        let d = cfg.head_dim();
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_kv_heads());
        let (qd, kvd) = (nh * d, nkv * d);
        let qkv_w = qd + 2 * kvd;
        // Each layer's routes, checked before anything is enqueued; Read-ME's shared routes are
        // built once. An in-model gate makes each layer's routes as the layer runs.
        // (In-model chunks carry no routes, so none are read from them.)
        let known = match self.in_model {
            Some(_) => None,
            None => {
                let routes = StepRoutes::of(chunks, nl);
                for (l, lw) in self.layers.iter().enumerate() {
                    if let LayerFfn::Moe { index, .. } = lw.ffn {
                        self.experts.check(index, routes.layer(l))?;
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
                    layers: vec![Vec::new(); nl],
                })
                .collect();
        }

        // Host-side step description, uploaded in three copies.
        let bs = self.kv.layout.block_size;
        let max_blocks = chunks
            .iter()
            .map(|c| (c.start_pos + c.tokens.len()).div_ceil(bs))
            .max()
            .unwrap_or(1)
            .max(1);
        let mut ids: Vec<u32> = Vec::with_capacity(n + m);
        let mut pos = Vec::with_capacity(n);
        let mut rows = Vec::with_capacity(n);
        let mut slots = Vec::with_capacity(n);
        let mut table = vec![0i32; chunks.len() * max_blocks];
        let mut logit_rows = Vec::with_capacity(m);
        let mut row0 = 0usize;
        for (ci, c) in chunks.iter().enumerate() {
            let blocks = &self.kv.seqs[&c.seq].blocks;
            let need = (c.start_pos + c.tokens.len()).div_ceil(bs);
            table[ci * max_blocks..ci * max_blocks + need].copy_from_slice(&blocks[..need]);
            for (i, &t) in c.tokens.iter().enumerate() {
                let p = c.start_pos + i;
                ids.push(t);
                pos.push(p as i32);
                rows.push(ci as i32);
                slots.push(self.kv.layout.slot(blocks, p).unwrap_or(-1));
            }
            row0 += c.tokens.len();
            if c.want_logits {
                logit_rows.push((row0 - 1) as u32);
            }
        }
        ids.extend_from_slice(&logit_rows);
        let mut ints = Vec::with_capacity(3 * n + table.len());
        ints.extend_from_slice(&pos);
        ints.extend_from_slice(&rows);
        ints.extend_from_slice(&slots);
        ints.extend_from_slice(&table);

        // Speculation (in-model gates only): the gating and the depth.
        let spec = match (self.in_model, self.speculation.as_ref()) {
            (Some(g), Some(sp)) => Some((g, sp.config().depth)),
            _ => None,
        };
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Internal("no workspace".into()))?;
        let s = &self.stream;
        if ints.len() > ws.ints.len() {
            return Err(Error::Internal(
                "step metadata exceeds the workspace".into(),
            ));
        }
        s.memcpy_htod(&ids, &mut ws.ids.slice_mut(..ids.len()))
            .map_err(dev)?;
        s.memcpy_htod(&ints, &mut ws.ints.slice_mut(..ints.len()))
            .map_err(dev)?;

        let kk = &self.kernels;
        let eps = cfg.rms_norm_eps;
        let theta = cfg.rope_theta;
        let layout = self.kv.layout;
        let shape = AttentionShape {
            n_tokens: n,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: d,
            q_stride: qkv_w,
            kv_stride: qkv_w,
            scale: 1.0 / (d as f32).sqrt(),
            window: cfg.sliding_window(),
        };
        let (o_pos, o_rows, o_slots, o_table) = (0, n, 2 * n, 3 * n);
        kk.embedding::<T>(s, &ws.ids.slice(..n), &self.embed, &mut ws.x, n, h, vocab)
            .map_err(dev)?;
        // The step's embeddings predict its first layers; their copies overlap layer 0's attention.
        if let (Some((g, depth)), Some(sp)) = (spec, self.speculation.as_mut()) {
            let bufs = (&ws.x, &mut ws.o, &mut ws.readback);
            let ahead = (None, depth);
            let dims = (n, h, eps);
            if let Some((targets, preds)) =
                predict_alone(&self.blas, kk, s, &self.layers, ahead, bufs, dims, g)?
            {
                speculate(&mut self.experts, sp, &targets, &preds, n, g, 0)?;
            }
        }
        // The previous MoE layer's synchronisation (time, decoder layer): the layer time.
        let mut last_sync: Option<(Instant, usize)> = None;
        for l in 0..nl {
            let lw = &self.layers[l];
            kk.rmsnorm::<T>(s, &ws.x, &lw.input_norm, &mut ws.h, n, h, eps)
                .map_err(dev)?;
            self.blas
                .linear::<T, T>(&ws.h, &lw.qkv, &mut ws.qkv, n, h, qkv_w)
                .map_err(dev)?;
            if let Some(b) = &lw.qkv_bias {
                kk.bias_add::<T>(s, &mut ws.qkv, b, n, qkv_w).map_err(dev)?;
            }
            // Per head or over the full width: groups of the weight's length.
            if let Some((nq, nk)) = &lw.qk_norm {
                let (wq, wk) = (nq.len(), nk.len());
                kk.rmsnorm_groups::<T>(s, &mut ws.qkv, nq, n, qkv_w, qd / wq, wq, eps)
                    .map_err(dev)?;
                kk.rmsnorm_groups::<T>(
                    s,
                    &mut ws.qkv.slice_mut(qd..),
                    nk,
                    n,
                    qkv_w,
                    kvd / wk,
                    wk,
                    eps,
                )
                .map_err(dev)?;
            }
            // OLMoE clamps after the norm, before RoPE.
            if let Some(c) = self.clip_qkv {
                kk.clamp::<T>(s, &mut ws.qkv, n * qkv_w, c).map_err(dev)?;
            }
            let positions = ws.ints.slice(o_pos..o_pos + n);
            kk.rope::<T>(s, &mut ws.qkv, &positions, n, qkv_w, nh, d, theta)
                .map_err(dev)?;
            kk.rope::<T>(
                s,
                &mut ws.qkv.slice_mut(qd..),
                &positions,
                n,
                qkv_w,
                nkv,
                d,
                theta,
            )
            .map_err(dev)?;
            let (kc, vc) = (&mut self.kv.k[l], &mut self.kv.v[l]);
            kk.kv_cache_write::<T>(
                s,
                &layout,
                &ws.qkv.slice(qd..),
                &ws.qkv.slice(qd + kvd..),
                qkv_w,
                &ws.ints.slice(o_slots..o_slots + n),
                n,
                kc,
                vc,
            )
            .map_err(dev)?;
            kk.attention_paged::<T>(
                s,
                &shape,
                &layout,
                &ws.qkv,
                &self.kv.k[l],
                &self.kv.v[l],
                &ws.ints.slice(o_table..o_table + table.len()),
                (chunks.len(), max_blocks),
                &ws.ints.slice(o_rows..o_rows + n),
                &positions,
                &mut ws.att,
            )
            .map_err(dev)?;
            self.blas
                .linear::<T, T>(&ws.att, &lw.o, &mut ws.o, n, qd, h)
                .map_err(dev)?;
            kk.add::<T>(s, &mut ws.x, &ws.o, n * h).map_err(dev)?;
            kk.rmsnorm::<T>(s, &ws.x, &lw.post_norm, &mut ws.h, n, h, eps)
                .map_err(dev)?;
            match &lw.ffn {
                LayerFfn::Dense {
                    gate_up,
                    down,
                    inter,
                } => {
                    // No routes to read back here: predicting costs a synchronisation of its
                    // own, and the copies overlap the dense MLP.
                    if let (Some((g, depth)), Some(sp)) = (spec, self.speculation.as_mut()) {
                        let bufs = (&ws.x, &mut ws.o, &mut ws.readback);
                        let ahead = (Some(l), depth);
                        let dims = (n, h, eps);
                        if let Some((targets, preds)) =
                            predict_alone(&self.blas, kk, s, &self.layers, ahead, bufs, dims, g)?
                        {
                            let now = Instant::now();
                            if let Some((then, from)) = last_sync {
                                sp.layer_time(now.duration_since(then).as_secs_f64(), l - from);
                            }
                            last_sync = Some((now, l));
                            speculate(&mut self.experts, sp, &targets, &preds, n, g, 0)?;
                        }
                    }
                    let plan = ExpertPlan {
                        counts: vec![n],
                        offsets: vec![0, n],
                    };
                    let weights = [Some(ExpertWeights { gate_up, down })];
                    let dims = FfnDims {
                        hidden: h,
                        inter: *inter,
                    };
                    self.blas
                        .expert_ffn::<T>(
                            kk,
                            &plan,
                            &weights,
                            dims,
                            &ws.h,
                            &mut ws.ffn_gate_up,
                            &mut ws.ffn_act,
                            &mut ws.o,
                        )
                        .map_err(dev)?;
                    kk.add::<T>(s, &mut ws.x, &ws.o, n * h).map_err(dev)?;
                }
                LayerFfn::Moe { index, gate } => {
                    let made;
                    let mut predicted = None;
                    let layer_routes = match (gate, self.in_model, &known) {
                        (Some(gate), Some(g), _) => {
                            // The coming layers' predictions share the exact routes' readback.
                            let targets = spec.map_or_else(Vec::new, |(_, depth)| {
                                spec_targets(&self.layers, Some(l), depth)
                            });
                            let at = 2 * n * g.top_k;
                            let bufs = (&ws.x, &mut ws.o, &mut ws.readback);
                            enqueue_predictions(
                                &self.blas,
                                kk,
                                s,
                                &self.layers,
                                &targets,
                                bufs,
                                at,
                                n,
                                h,
                                g,
                                eps,
                            )?;
                            let extra = targets.len() * n * g.experts;
                            let (routes, preds) = gate_routes(
                                &self.blas,
                                kk,
                                s,
                                &ws.h,
                                gate,
                                g,
                                (n, h),
                                &mut ws.gate_logits,
                                &mut ws.readback,
                                extra,
                            )?;
                            made = routes;
                            predicted = spec.map(|(g, _)| (g, targets, preds));
                            &made[..]
                        }
                        (_, _, Some(known)) => known.layer(l),
                        _ => {
                            return Err(Error::Internal(format!("layer {l} has no routes")));
                        }
                    };
                    if let Some(trace) = self.trace.as_mut() {
                        let mut at = 0;
                        for (entry, c) in trace.iter_mut().zip(chunks) {
                            let len = c.tokens.len();
                            entry.layers[l] = layer_routes[at..at + len].to_vec();
                            at += len;
                        }
                    }
                    if let (Some(sp), Some(_)) = (self.speculation.as_mut(), &predicted) {
                        let now = Instant::now();
                        if let Some((then, from)) = last_sync {
                            sp.layer_time(now.duration_since(then).as_secs_f64(), l - from);
                        }
                        last_sync = Some((now, l));
                        let mut exact = ExpertSet::default();
                        for r in layer_routes {
                            for &e in r.experts() {
                                exact.insert(e);
                            }
                        }
                        sp.observe(*index, &exact, self.experts.cache())?;
                    }
                    let copied = self.experts.bytes_copied();
                    // The layer's experts, added into the residual stream, on this backend's
                    // stream; their misses go on the copy stream ahead of any speculative copy.
                    self.experts.forward_layer(
                        *index,
                        &ws.h,
                        layer_routes,
                        &mut ws.x,
                        true,
                        &self.stream,
                    )?;
                    if let (Some(sp), Some((g, targets, preds))) =
                        (self.speculation.as_mut(), &predicted)
                    {
                        let queued = self.experts.bytes_copied() - copied;
                        speculate(&mut self.experts, sp, targets, preds, n, *g, queued)?;
                    }
                }
            }
        }
        for c in chunks {
            if let Some(sb) = self.kv.seqs.get_mut(&c.seq) {
                sb.len += c.tokens.len();
            }
        }
        if m == 0 {
            return Ok(Vec::new());
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        kk.embedding::<T>(s, &ws.ids.slice(n..n + m), &ws.x, &mut ws.last, m, h, n)
            .map_err(dev)?;
        kk.rmsnorm::<T>(s, &ws.last, &self.norm, &mut ws.normed, m, h, eps)
            .map_err(dev)?;
        self.blas
            .linear::<T, f32>(&ws.normed, head, &mut ws.logits, m, h, vocab)
            .map_err(dev)?;
        let host = s.clone_dtoh(&ws.logits.slice(..m * vocab)).map_err(dev)?;
        Ok(host.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }
}

impl<T: DeviceElem> Backend for CudaBackend<T> {
    fn device_name(&self) -> String {
        self.device.clone()
    }

    fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn add_sequence(&mut self, seq: SeqId, max_len: usize) -> Result<()> {
        crate::engine::check_max_len(&self.cfg, max_len)?;
        self.kv.add(seq, max_len)
    }

    fn remove_sequence(&mut self, seq: SeqId) {
        self.kv.remove(seq);
    }

    fn forward(&mut self, chunks: &[ForwardChunk<'_>]) -> Result<Vec<Vec<f32>>> {
        self.apply_reconfigure()?;
        let start = Instant::now();
        let before = self.experts.cache().stats();
        let copied = self.experts.bytes_copied();
        let stalled = self.experts.stats().stall_seconds;
        let prefetched = self.experts.stats().prefetches;
        let out = self.run(chunks);
        // Whatever happened, the step's pins end with it.
        self.experts.end_step();
        if out.is_err() {
            // Leave the device idle and consistent; the error is what the caller sees.
            let _ = self.stream.synchronize();
        }
        let after = self.experts.cache().stats();
        if let Ok(mut st) = self.stats.stats.lock() {
            st.steps += 1;
            st.step_seconds += start.elapsed().as_secs_f64();
            st.stall_seconds += self.experts.stats().stall_seconds - stalled;
            st.hits += after.hits - before.hits;
            st.misses += after.misses - before.misses;
            st.bytes_loaded += self.experts.bytes_copied() - copied;
            // The step's speculative loads (the lookahead's are counted in `prepare`).
            st.prefetches += self.experts.stats().prefetches - prefetched;
        }
        out
    }

    fn speculation_stats(&self) -> Option<SpeculationStats> {
        CudaBackend::speculation_stats(self)
    }

    fn prepare(&mut self, lookahead: &Lookahead) -> Result<()> {
        self.apply_reconfigure()?;
        if self.in_model.is_some() {
            // No route is known ahead: the cache loads on demand.
            return Ok(());
        }
        let steps = step_experts(&lookahead.steps, self.cfg.num_hidden_layers);
        let before = self.experts.bytes_copied();
        let issued = self.experts.plan(&steps)?;
        if let Ok(mut s) = self.stats.stats.lock() {
            s.prefetches += issued as u64;
            s.bytes_loaded += self.experts.bytes_copied() - before;
        }
        Ok(())
    }

    fn expert_cache(&self) -> Option<&ExpertCache> {
        Some(self.experts.cache())
    }

    fn expert_stall_seconds(&self) -> f64 {
        self.stats.snapshot().stall_seconds
    }

    fn trace_routes(&mut self, on: bool) -> Result<()> {
        self.trace = crate::engine::route_trace(on, self.in_model.is_some())?;
        Ok(())
    }

    fn take_route_trace(&mut self) -> Vec<ChunkRoutes> {
        self.trace.as_mut().map(std::mem::take).unwrap_or_default()
    }
}

/// A layer predicted ahead: its decoder layer, its index in the expert runtime, and how many
/// decoder layers ahead of the predicting point it is.
#[derive(Debug, Clone, Copy)]
struct SpecTarget {
    layer: usize,
    index: usize,
    distance: usize,
}

/// The MoE layers with their own gate among the `depth` decoder layers after `from` (the first
/// `depth` layers when `None`, predicted from the embeddings): dense layers count in the distance.
fn spec_targets<T>(
    layers: &[LayerWeights<T>],
    from: Option<usize>,
    depth: usize,
) -> Vec<SpecTarget> {
    let first = from.map_or(0, |l| l + 1);
    (first..layers.len().min(first + depth))
        .filter_map(|t| match &layers[t].ffn {
            LayerFfn::Moe {
                index,
                gate: Some(_),
            } => Some(SpecTarget {
                layer: t,
                index: *index,
                distance: t + 1 - first,
            }),
            _ => None,
        })
        .collect()
}

/// Enqueues the predicted gate logits of `targets`: each layer's own post-attention RMSNorm of the
/// residual stream `x` (into `scratch`, `[n, H]`) and its gate GEMM into `out`, `[n, E]` per
/// target from offset `at`, in f32. Softmax is monotone, so logits rank experts as the gate's
/// probabilities do.
#[allow(clippy::too_many_arguments)]
fn enqueue_predictions<T: DeviceElem>(
    blas: &Blas,
    kk: &KernelSet,
    s: &Arc<CudaStream>,
    layers: &[LayerWeights<T>],
    targets: &[SpecTarget],
    (x, scratch, out): (&CudaSlice<T>, &mut CudaSlice<T>, &mut CudaSlice<f32>),
    at: usize,
    n: usize,
    h: usize,
    g: InModelGating,
    eps: f32,
) -> Result<()> {
    let e = g.experts;
    for (i, t) in targets.iter().enumerate() {
        let lw = &layers[t.layer];
        let LayerFfn::Moe {
            gate: Some(gate), ..
        } = &lw.ffn
        else {
            return Err(Error::Internal(format!("layer {} has no gate", t.layer)));
        };
        kk.rmsnorm::<T>(s, x, &lw.post_norm, scratch, n, h, eps)
            .map_err(dev)?;
        let from = at + i * n * e;
        let mut y = out
            .try_slice_mut(from..from + n * e)
            .ok_or_else(|| Error::Internal("predictions exceed the readback buffer".into()))?;
        blas.linear::<T, f32>(scratch, gate, &mut y, n, h, e)
            .map_err(dev)?;
    }
    Ok(())
}

/// Copies `len` values of `readback` from `at` to the host: one copy, one synchronisation.
fn read_back(
    s: &Arc<CudaStream>,
    readback: &CudaSlice<f32>,
    at: usize,
    len: usize,
) -> Result<Vec<f32>> {
    let mut host = vec![0.0f32; len];
    if len == 0 {
        return Ok(host);
    }
    let src = readback
        .try_slice(at..at + len)
        .ok_or_else(|| Error::Internal("a readback beyond its buffer".into()))?;
    s.memcpy_dtoh(&src, &mut host).map_err(dev)?;
    s.synchronize().map_err(dev)?;
    Ok(host)
}

/// Predicts the MoE layers up to `depth` decoder layers after `from` (`None`: from the start)
/// with a synchronisation of its own (where no exact routes are read back to share it with):
/// their logits, `[n, E]` per target, read back after the exact routes' place in `readback`.
/// `None` when no MoE layer is in reach.
#[allow(clippy::too_many_arguments)]
fn predict_alone<T: DeviceElem>(
    blas: &Blas,
    kk: &KernelSet,
    s: &Arc<CudaStream>,
    layers: &[LayerWeights<T>],
    (from, depth): (Option<usize>, usize),
    (x, scratch, readback): (&CudaSlice<T>, &mut CudaSlice<T>, &mut CudaSlice<f32>),
    (n, h, eps): (usize, usize, f32),
    g: InModelGating,
) -> Result<Option<(Vec<SpecTarget>, Vec<f32>)>> {
    let targets = spec_targets(layers, from, depth);
    if targets.is_empty() {
        return Ok(None);
    }
    let at = 2 * n * g.top_k;
    let len = targets.len() * n * g.experts;
    let bufs = (x, &mut *scratch, &mut *readback);
    enqueue_predictions(blas, kk, s, layers, &targets, bufs, at, n, h, g, eps)?;
    let preds = read_back(s, readback, at, len)?;
    Ok(Some((targets, preds)))
}

/// Hands the predicted logits `preds` (`[n, E]` per target) to the expert runtime, after
/// `queued` bytes of exact loads. A prediction only saves loads: a bad one (a NaN) leaves the
/// exact path alone; a device error is the step's.
fn speculate<T: DeviceElem>(
    experts: &mut CudaExperts<T>,
    sp: &mut CudaSpeculation,
    targets: &[SpecTarget],
    preds: &[f32],
    n: usize,
    g: InModelGating,
    queued: u64,
) -> Result<()> {
    let per = n * g.experts;
    let scores: Vec<LayerScores<'_>> = targets
        .iter()
        .zip(preds.chunks_exact(per.max(1)))
        .map(|(t, scores)| LayerScores {
            layer: t.index,
            distance: t.distance,
            scores,
            top_k: g.top_k,
        })
        .collect();
    match experts.speculate(sp, &scores, queued) {
        Ok(_) | Err(Error::InvalidArgument(_)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The routes of `x` (`[n, H]`, the layer's post-attention-normed hidden states) under `gate`
/// (`[E, H]`): logits in f32 by cuBLAS, softmax top-k on the device into the head of `readback`
/// (weights, then ids), then one copy of that head and the `extra` values after it (the
/// predictions) to the host: the one host synchronisation of an in-model MoE layer. Returns the
/// routes and the extra values.
#[allow(clippy::too_many_arguments)]
fn gate_routes<T: DeviceElem>(
    blas: &Blas,
    kk: &KernelSet,
    s: &Arc<CudaStream>,
    x: &CudaSlice<T>,
    gate: &CudaSlice<T>,
    g: InModelGating,
    (n, h): (usize, usize),
    logits: &mut CudaSlice<f32>,
    readback: &mut CudaSlice<f32>,
    extra: usize,
) -> Result<(Vec<TokenRoute>, Vec<f32>)> {
    let (e, k) = (g.experts, g.top_k);
    let nk = n * k;
    blas.linear::<T, f32>(x, gate, logits, n, h, e)
        .map_err(dev)?;
    {
        let mut head = readback
            .try_slice_mut(..2 * nk)
            .ok_or_else(|| Error::Internal("routes exceed the readback buffer".into()))?;
        let (mut weights, mut ids) = head.split_at_mut(nk);
        // SAFETY: i32 and f32 have the same size and every bit pattern is valid for both; the
        // kernel writes i32 ids here and the host reads them back by their bits.
        let mut ids = unsafe { ids.transmute_mut::<i32>(nk) }
            .ok_or_else(|| Error::Internal("no room for the gate's ids".into()))?;
        kk.gate_softmax_topk(s, logits, n, e, k, g.renormalize, &mut ids, &mut weights)
            .map_err(dev)?;
    }
    let host = read_back(s, readback, 0, 2 * nk + extra)?;
    let (head, preds) = host.split_at(2 * nk);
    let (weights, ids) = head.split_at(nk);
    let routes = ids
        .chunks_exact(k)
        .zip(weights.chunks_exact(k))
        .map(|(i, w)| {
            let experts = i
                .iter()
                .map(|&bits| {
                    let v = bits.to_bits() as i32;
                    u16::try_from(v)
                        .ok()
                        .filter(|&v| (v as usize) < e)
                        .ok_or_else(|| Error::Internal(format!("the gate chose expert {v}")))
                })
                .collect::<Result<Vec<_>>>()?;
            TokenRoute::new(&experts, w)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((routes, preds.to_vec()))
}

impl<T: DeviceElem> Drop for CudaBackend<T> {
    fn drop(&mut self) {
        // Let queued work finish before buffers are freed; an error here is recorded by the
        // context, never panicked on.
        let _ = self.stream.synchronize();
    }
}
