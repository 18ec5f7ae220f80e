//! The CUDA backend: the backbone of one model on one device (see the module docs of
//! [`crate::cuda`]); its routed experts are the expert runtime's ([`CudaExperts`]).

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream};
use pregate_kernels::{AttentionShape, Blas, KernelSet, PagedKvLayout};

use super::experts::{CudaExperts, ExpertSetup};
use super::kv::PagedKv;
use super::weights::{upload, upload_stacked, DeviceElem};
use super::{dev, CacheSetup, CudaHandle, CudaOptions};
use crate::cache::ExpertCache;
use crate::config::ModelConfig;
use crate::engine::{Backend, ForwardChunk, Lookahead, SeqId, StepRoutes};
use crate::error::{Error, Result};
use crate::model::family::{AttnProj, TensorRole};
use crate::model::{ExpertLayout, ModelDir};
use crate::moe::step_experts;

/// Per-layer dense weights.
struct LayerWeights<T> {
    input_norm: CudaSlice<T>,
    /// q, k, v rows stacked: `[(nH + 2 nKV) d, H]`.
    qkv: CudaSlice<T>,
    o: CudaSlice<T>,
    post_norm: CudaSlice<T>,
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
        for layer in 0..cfg.num_hidden_layers {
            let attn = |proj| inventory.require(TensorRole::Attention { layer, proj });
            let [q, k, vv] = [attn(AttnProj::Q)?, attn(AttnProj::K)?, attn(AttnProj::V)?];
            let rows = |t: &crate::model::family::TensorSpec| t.shape[0];
            let qkv = [
                (&*q.name, rows(q)),
                (&*k.name, rows(k)),
                (&*vv.name, rows(vv)),
            ];
            layers.push(LayerWeights {
                input_norm: one(TensorRole::InputNorm { layer })?,
                qkv: upload_stacked::<T>(&stream, ck, &qkv, h)?,
                o: one(TensorRole::Attention {
                    layer,
                    proj: AttnProj::O,
                })?,
                post_norm: one(TensorRole::PostAttentionNorm { layer })?,
            });
        }
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
        })
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
        let Some(setup) = self
            .stats
            .reconfigure
            .lock()
            .ok()
            .and_then(|mut r| r.take())
        else {
            return Ok(());
        };
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
        if let Some(ws) = &self.ws {
            if ws.tokens >= tokens && ws.logit_rows >= logit_rows {
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
            c.check(kv.len, kv.max_len, vocab)?;
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
        // built once.
        let routes = StepRoutes::of(chunks, nl);
        for l in 0..nl {
            self.experts.check(l, routes.layer(l))?;
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
        };
        let (o_pos, o_rows, o_slots, o_table) = (0, n, 2 * n, 3 * n);
        kk.embedding::<T>(s, &ws.ids.slice(..n), &self.embed, &mut ws.x, n, h, vocab)
            .map_err(dev)?;
        for l in 0..nl {
            let lw = &self.layers[l];
            kk.rmsnorm::<T>(s, &ws.x, &lw.input_norm, &mut ws.h, n, h, eps)
                .map_err(dev)?;
            self.blas
                .linear::<T, T>(&ws.h, &lw.qkv, &mut ws.qkv, n, h, qkv_w)
                .map_err(dev)?;
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
            // The layer's experts, added into the residual stream, on this backend's stream.
            self.experts
                .forward_layer(l, &ws.h, routes.layer(l), &mut ws.x, true, &self.stream)?;
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
        }
        out
    }

    fn prepare(&mut self, lookahead: &Lookahead) -> Result<()> {
        self.apply_reconfigure()?;
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
}

impl<T: DeviceElem> Drop for CudaBackend<T> {
    fn drop(&mut self) {
        // Let queued work finish before buffers are freed; an error here is recorded by the
        // context, never panicked on.
        let _ = self.stream.synchronize();
    }
}
