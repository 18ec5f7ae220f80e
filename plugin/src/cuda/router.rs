//! The Read-ME router on the device.
//!
//! The host router reads every sequence's router KV cache once per decode step (4 KiB of f32 per
//! token of context), so at long contexts and large batches it costs the host a large share of a
//! device step, with the device idle. Here the same block runs on a stream of its own, from the
//! kernels the backbone uses, with a paged router KV cache of as many tokens as the backbone's:
//! the engine opens a sequence's router state beside its KV reservation. Only the logits (`N` floats per token) come back to the
//! host, where [`crate::router::ReadMeRouter::routes_from_logits`] picks the experts exactly as the
//! host router does, since the batcher and the expert cache need the routes on the host before the
//! next step is launched.
//!
//! The router computes in f32 whatever the backbone's type: its weights are 18 M parameters, and
//! routes then agree with the host router's to f32 rounding instead of flipping near-ties in bf16.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use pregate_kernels::{AttentionShape, Blas, KernelSet, PagedKvLayout};

use super::dev;
use super::kv::PagedKv;
use crate::config::ModelConfig;
use crate::engine::SeqId;
use crate::error::{Error, Result};
use crate::model::weights::{Linear, RouterWeights};
use crate::route::TokenRoute;
use crate::router::{check_tokens, routes_per_sequence, Router, RouterKind, ROUTER_EPS};

/// A linear layer on the device: `[out, in]` weight and `[out]` bias.
struct DeviceLinear {
    w: CudaSlice<f32>,
    b: CudaSlice<f32>,
    out: usize,
    inp: usize,
}

impl DeviceLinear {
    /// Uploads `parts` stacked by output rows (q, k and v become one `[3D, D]` layer).
    fn upload(stream: &Arc<CudaStream>, parts: &[&Linear]) -> Result<Self> {
        let inp = parts.first().map_or(0, |l| l.weight.cols);
        let mut w = Vec::new();
        let mut b = Vec::new();
        for l in parts {
            if l.weight.cols != inp || l.bias.len() != l.weight.rows {
                return Err(Error::Internal(
                    "router layers to stack differ in shape".into(),
                ));
            }
            w.extend_from_slice(&l.weight.data);
            b.extend_from_slice(&l.bias);
        }
        let out = b.len();
        Ok(DeviceLinear {
            w: upload(stream, &w, "router weights")?,
            b: upload(stream, &b, "router biases")?,
            out,
            inp,
        })
    }

    /// `y[n, out] = x[n, in] W^T + b`.
    fn run(
        &self,
        blas: &Blas,
        kernels: &KernelSet,
        stream: &CudaStream,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        let (x, mut yv) = (x.slice(..n * self.inp), y.slice_mut(..n * self.out));
        blas.linear::<f32, f32>(&x, &self.w, &mut yv, n, self.inp, self.out)
            .map_err(dev)?;
        kernels
            .bias_add::<f32>(stream, &mut yv, &self.b, n, self.out)
            .map_err(dev)
    }
}

fn upload(stream: &Arc<CudaStream>, host: &[f32], what: &str) -> Result<CudaSlice<f32>> {
    stream
        .clone_htod(host)
        .map_err(|e| Error::Capacity(format!("uploading the {what} ({} floats): {e}", host.len())))
}

/// Buffers of one routing pass, grown to the largest seen.
struct Workspace {
    tokens: usize,
    ints: usize,
    ids: CudaSlice<u32>,
    /// Positions, block-table rows and cache slots of the tokens, then the block tables.
    meta: CudaSlice<i32>,
    x: CudaSlice<f32>,
    h: CudaSlice<f32>,
    qkv: CudaSlice<f32>,
    att: CudaSlice<f32>,
    o: CudaSlice<f32>,
    mid: CudaSlice<f32>,
    logits: CudaSlice<f32>,
}

/// The pre-gating router's weights and KV cache on the device.
pub(super) struct DeviceRouter {
    dim: usize,
    inter: usize,
    n_experts: usize,
    vocab: usize,
    heads: usize,
    head_dim: usize,
    theta: f32,
    scale: f32,
    max_pos: usize,
    embed: CudaSlice<f32>,
    input_norm: CudaSlice<f32>,
    qkv: DeviceLinear,
    o: DeviceLinear,
    post_norm: CudaSlice<f32>,
    proj_1: DeviceLinear,
    proj_2: DeviceLinear,
    out_norm: CudaSlice<f32>,
    proj_out: DeviceLinear,
    kv: PagedKv<f32>,
    ws: Option<Workspace>,
}

impl DeviceRouter {
    /// Uploads `w` and allocates a router KV cache of `kv_tokens` tokens in blocks of
    /// `block_size` (the backbone's, so both caches hold the same sequences).
    pub fn new(
        stream: &Arc<CudaStream>,
        w: &RouterWeights,
        cfg: &ModelConfig,
        kv_tokens: usize,
        block_size: usize,
    ) -> Result<Self> {
        let r = &w.config;
        let (dim, head_dim) = (r.embedding_dim, r.head_dim());
        let layout = PagedKvLayout {
            num_blocks: kv_tokens.div_ceil(block_size.max(1)).max(1),
            block_size: block_size.max(1),
            n_kv_heads: r.n_head,
            head_dim,
        };
        Ok(DeviceRouter {
            dim,
            inter: w.proj_1.weight.rows,
            n_experts: cfg.n_cluster,
            vocab: cfg.vocab_size,
            heads: r.n_head,
            head_dim,
            theta: cfg.rope_theta,
            scale: 1.0 / r.normalizer,
            max_pos: r.max_position_embeddings_predictor,
            embed: upload(stream, &w.embed.data, "router embedding")?,
            input_norm: upload(stream, &w.input_norm, "router norm")?,
            qkv: DeviceLinear::upload(stream, &[&w.q, &w.k, &w.v])?,
            o: DeviceLinear::upload(stream, &[&w.o])?,
            post_norm: upload(stream, &w.post_norm, "router norm")?,
            proj_1: DeviceLinear::upload(stream, &[&w.proj_1])?,
            proj_2: DeviceLinear::upload(stream, &[&w.proj_2])?,
            out_norm: upload(stream, &w.out_norm, "router norm")?,
            proj_out: DeviceLinear::upload(stream, &[&w.proj_out])?,
            kv: PagedKv::new(stream, 1, layout)?,
            ws: None,
        })
    }

    /// Reserves router KV space for a sequence of up to `max_len` tokens (at most the router's
    /// context; routing past it is an error, as on the host).
    pub fn add(&mut self, seq: SeqId, max_len: usize) -> Result<()> {
        self.kv.add(seq, max_len.min(self.max_pos))
    }

    /// Frees a sequence's router KV space.
    pub fn remove(&mut self, seq: SeqId) {
        self.kv.remove(seq);
    }

    fn check(&self, seqs: &[SeqId], tokens: &[&[u32]]) -> Result<()> {
        if seqs.len() != tokens.len() {
            return Err(Error::Internal(format!(
                "router: {} sequences for {} token lists",
                seqs.len(),
                tokens.len()
            )));
        }
        for (i, (&seq, toks)) in seqs.iter().zip(tokens).enumerate() {
            if seqs[..i].contains(&seq) {
                return Err(Error::Internal(format!(
                    "router: sequence {seq} appears twice in one pass"
                )));
            }
            let s = self.kv.seqs.get(&seq).ok_or(Error::UnknownSequence(seq))?;
            check_tokens(s.len, self.max_pos, self.vocab, toks)?;
            if s.len + toks.len() > s.max_len {
                return Err(Error::Capacity(format!(
                    "sequence {seq} would exceed its {} reserved router tokens",
                    s.max_len
                )));
            }
        }
        Ok(())
    }

    fn ensure_workspace(
        &mut self,
        stream: &Arc<CudaStream>,
        tokens: usize,
        ints: usize,
    ) -> Result<()> {
        if let Some(ws) = &self.ws {
            if ws.tokens >= tokens && ws.ints >= ints {
                return Ok(());
            }
        }
        let tokens = tokens.max(self.ws.as_ref().map_or(0, |w| w.tokens)).max(16);
        let ints = ints.max(self.ws.as_ref().map_or(0, |w| w.ints)).max(64);
        self.ws = None;
        stream.synchronize().map_err(dev)?;
        let alloc = |n: usize| -> Result<CudaSlice<f32>> {
            stream
                .alloc_zeros::<f32>(n.max(1))
                .map_err(|e| Error::Capacity(format!("router workspace of {n} floats: {e}")))
        };
        let d = self.dim;
        self.ws = Some(Workspace {
            tokens,
            ints,
            ids: stream.alloc_zeros::<u32>(tokens).map_err(dev)?,
            meta: stream.alloc_zeros::<i32>(ints).map_err(dev)?,
            x: alloc(tokens * d)?,
            h: alloc(tokens * d)?,
            qkv: alloc(tokens * 3 * d)?,
            att: alloc(tokens * d)?,
            o: alloc(tokens * d)?,
            mid: alloc(tokens * self.inter)?,
            logits: alloc(tokens * self.n_experts)?,
        });
        Ok(())
    }

    /// Router logits (`[sum T_i, N]`, rows in order) of `tokens[i]`, which follow the tokens
    /// sequence `seqs[i]` was routed with before. Checked before anything changes; reading the
    /// logits back is the pass's one synchronisation.
    pub fn logits(
        &mut self,
        stream: &Arc<CudaStream>,
        kernels: &KernelSet,
        blas: &Blas,
        seqs: &[SeqId],
        tokens: &[&[u32]],
    ) -> Result<Vec<f32>> {
        self.check(seqs, tokens)?;
        let n: usize = tokens.iter().map(|t| t.len()).sum();
        if n == 0 {
            return Ok(Vec::new());
        }
        let layout = self.kv.layout;
        let seq_state: Vec<(&[i32], usize)> = seqs
            .iter()
            .map(|s| {
                let b = &self.kv.seqs[s];
                (b.blocks.as_slice(), b.len)
            })
            .collect();
        let (ids, meta, max_blocks) = pass_meta(&layout, &seq_state, tokens);
        self.ensure_workspace(stream, n, meta.len())?;
        let ws = self
            .ws
            .as_mut()
            .ok_or_else(|| Error::Internal("no router workspace".into()))?;
        let (d, s, kk) = (self.dim, stream.as_ref(), kernels);
        stream
            .memcpy_htod(&ids, &mut ws.ids.slice_mut(..n))
            .map_err(dev)?;
        stream
            .memcpy_htod(&meta, &mut ws.meta.slice_mut(..meta.len()))
            .map_err(dev)?;
        let positions = ws.meta.slice(..n);
        let rows = ws.meta.slice(n..2 * n);
        let slots = ws.meta.slice(2 * n..3 * n);
        let table = ws.meta.slice(3 * n..meta.len());
        let qkv_w = 3 * d;

        kk.embedding::<f32>(
            s,
            &ws.ids.slice(..n),
            &self.embed,
            &mut ws.x,
            n,
            d,
            self.vocab,
        )
        .map_err(dev)?;
        kk.rmsnorm::<f32>(s, &ws.x, &self.input_norm, &mut ws.h, n, d, ROUTER_EPS)
            .map_err(dev)?;
        self.qkv.run(blas, kk, s, &ws.h, &mut ws.qkv, n)?;
        // q's heads and then k's heads are adjacent in each row and rotate alike: one launch.
        kk.rope::<f32>(
            s,
            &mut ws.qkv,
            &positions,
            n,
            qkv_w,
            2 * self.heads,
            self.head_dim,
            self.theta,
        )
        .map_err(dev)?;
        kk.kv_cache_write::<f32>(
            s,
            &layout,
            &ws.qkv.slice(d..),
            &ws.qkv.slice(2 * d..),
            qkv_w,
            &slots,
            n,
            &mut self.kv.k[0],
            &mut self.kv.v[0],
        )
        .map_err(dev)?;
        let shape = AttentionShape {
            n_tokens: n,
            n_heads: self.heads,
            n_kv_heads: self.heads,
            head_dim: self.head_dim,
            q_stride: qkv_w,
            kv_stride: qkv_w,
            // Read-ME divides by `normalizer`, not by sqrt(head_dim).
            scale: self.scale,
            window: None,
        };
        kk.attention_paged::<f32>(
            s,
            &shape,
            &layout,
            &ws.qkv,
            &self.kv.k[0],
            &self.kv.v[0],
            &table,
            (seqs.len(), max_blocks),
            &rows,
            &positions,
            &mut ws.att,
        )
        .map_err(dev)?;
        self.o.run(blas, kk, s, &ws.att, &mut ws.o, n)?;
        kk.add::<f32>(s, &mut ws.x, &ws.o, n * d).map_err(dev)?;
        kk.rmsnorm::<f32>(s, &ws.x, &self.post_norm, &mut ws.h, n, d, ROUTER_EPS)
            .map_err(dev)?;
        self.proj_1.run(blas, kk, s, &ws.h, &mut ws.mid, n)?;
        kk.silu::<f32>(s, &mut ws.mid, n * self.inter)
            .map_err(dev)?;
        self.proj_2.run(blas, kk, s, &ws.mid, &mut ws.o, n)?;
        kk.add::<f32>(s, &mut ws.x, &ws.o, n * d).map_err(dev)?;
        kk.rmsnorm::<f32>(s, &ws.x, &self.out_norm, &mut ws.h, n, d, ROUTER_EPS)
            .map_err(dev)?;
        self.proj_out.run(blas, kk, s, &ws.h, &mut ws.logits, n)?;
        let host = stream
            .clone_dtoh(&ws.logits.slice(..n * self.n_experts))
            .map_err(dev)?;
        for (seq, toks) in seqs.iter().zip(tokens) {
            if let Some(s) = self.kv.seqs.get_mut(seq) {
                s.len += toks.len();
            }
        }
        Ok(host)
    }
}

/// The Read-ME router on a CUDA device, as a [`Router`]: its own stream and cuBLAS handle, the
/// backbone's compiled kernels, and the experts picked on the host from the logits read back
/// (exactly as the host router picks them).
pub struct CudaReadMeRouter {
    stream: Arc<CudaStream>,
    kernels: Arc<KernelSet>,
    blas: Blas,
    router: DeviceRouter,
    top_k: usize,
    device: String,
}

impl CudaReadMeRouter {
    /// Uploads the router `w` of model `cfg` to the device of `ctx`, with a router KV cache of
    /// `kv_tokens` tokens in blocks of `block_size`.
    pub fn new(
        ctx: &Arc<CudaContext>,
        kernels: Arc<KernelSet>,
        w: &RouterWeights,
        cfg: &ModelConfig,
        kv_tokens: usize,
        block_size: usize,
    ) -> Result<Self> {
        let stream = ctx.new_stream().map_err(dev)?;
        let blas = Blas::new(&stream).map_err(dev)?;
        let router = DeviceRouter::new(&stream, w, cfg, kv_tokens, block_size)?;
        stream.synchronize().map_err(dev)?;
        Ok(CudaReadMeRouter {
            stream,
            kernels,
            blas,
            router,
            top_k: cfg.router_top_k.max(1),
            device: format!("cuda:{}", ctx.ordinal()),
        })
    }

    /// The router logits (`[sum T_i, N]`) of `tokens[i]` following sequence `seqs[i]`'s earlier
    /// tokens (what [`Router::route`] selects from).
    pub fn logits(&mut self, seqs: &[SeqId], tokens: &[&[u32]]) -> Result<Vec<f32>> {
        let out = self
            .router
            .logits(&self.stream, &self.kernels, &self.blas, seqs, tokens);
        if out.is_err() {
            // Leave the device idle and consistent; the error is what the caller sees.
            let _ = self.stream.synchronize();
        }
        out
    }
}

impl Router for CudaReadMeRouter {
    fn kind(&self) -> RouterKind {
        RouterKind::PreGate
    }

    fn num_experts(&self) -> usize {
        self.router.n_experts
    }

    fn top_k(&self) -> usize {
        self.top_k
    }

    fn placement(&self) -> String {
        self.device.clone()
    }

    fn open(&mut self, seq: SeqId, max_len: usize) -> Result<()> {
        self.router.add(seq, max_len)
    }

    fn close(&mut self, seq: SeqId) {
        self.router.remove(seq);
    }

    fn route(&mut self, seqs: &[SeqId], tokens: &[&[u32]]) -> Result<Vec<Vec<TokenRoute>>> {
        let logits = self.logits(seqs, tokens)?;
        Ok(routes_per_sequence(
            &logits,
            self.router.n_experts,
            self.top_k,
            tokens,
        ))
    }
}

/// The host-side description of one routing pass, uploaded before its kernels: the token ids, then
/// `meta` = positions, block-table rows and cache slots of the `n` tokens, then a block table of
/// `max_blocks` columns per sequence (unused entries 0; `attention_paged` reads only the blocks
/// below each token's position). `seqs[i]` = (its KV blocks, tokens routed so far); the caller
/// has checked that every new token fits in its blocks.
fn pass_meta(
    layout: &PagedKvLayout,
    seqs: &[(&[i32], usize)],
    tokens: &[&[u32]],
) -> (Vec<u32>, Vec<i32>, usize) {
    let n: usize = tokens.iter().map(|t| t.len()).sum();
    let bs = layout.block_size;
    let max_blocks = seqs
        .iter()
        .zip(tokens)
        .map(|(&(_, len), t)| (len + t.len()).div_ceil(bs))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut ids = Vec::with_capacity(n);
    let mut meta = vec![0i32; 3 * n + seqs.len() * max_blocks];
    let mut t = 0;
    for (row, (&(blocks, len), toks)) in seqs.iter().zip(tokens).enumerate() {
        let need = (len + toks.len()).div_ceil(bs).min(blocks.len());
        let at = 3 * n + row * max_blocks;
        meta[at..at + need].copy_from_slice(&blocks[..need]);
        for (i, &id) in toks.iter().enumerate() {
            let pos = len + i;
            ids.push(id);
            meta[t] = pos as i32;
            meta[n + t] = row as i32;
            meta[2 * n + t] = layout.slot(blocks, pos).unwrap_or(-1);
            t += 1;
        }
    }
    (ids, meta, max_blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_describes_each_token_at_its_own_position_slot_and_table_row() {
        let layout = PagedKvLayout {
            num_blocks: 16,
            block_size: 4,
            n_kv_heads: 4,
            head_dim: 8,
        };
        // Sequence 0: 6 tokens routed in blocks [9, 2]; it gets one more (position 6, block 2).
        // Sequence 1: nothing routed yet in blocks [5, 11, 7]; a 5-token prompt (positions 0..5).
        let a: &[i32] = &[9, 2];
        let b: &[i32] = &[5, 11, 7];
        let (ids, meta, max_blocks) =
            pass_meta(&layout, &[(a, 6), (b, 0)], &[&[42], &[1, 2, 3, 4, 5]]);
        let n = 6;
        assert_eq!(ids, vec![42, 1, 2, 3, 4, 5]);
        assert_eq!(max_blocks, 2);
        assert_eq!(&meta[..n], &[6, 0, 1, 2, 3, 4], "positions");
        assert_eq!(&meta[n..2 * n], &[0, 1, 1, 1, 1, 1], "table rows");
        // slot = block * block_size + pos % block_size
        assert_eq!(
            &meta[2 * n..3 * n],
            &[2 * 4 + 2, 5 * 4, 5 * 4 + 1, 5 * 4 + 2, 5 * 4 + 3, 11 * 4],
            "cache slots"
        );
        assert_eq!(
            &meta[3 * n..],
            &[9, 2, 5, 11],
            "block tables, one row per sequence"
        );
        assert_eq!(meta.len(), 3 * n + 2 * max_blocks);
        // Every token's slot is the one `attention_paged` reads back through its table row.
        for t in 0..n {
            let row = meta[n + t] as usize;
            let table = &meta[3 * n + row * max_blocks..3 * n + (row + 1) * max_blocks];
            assert_eq!(layout.slot(table, meta[t] as usize), Some(meta[2 * n + t]));
        }
    }

    #[test]
    fn an_empty_pass_has_one_table_column() {
        let layout = PagedKvLayout {
            num_blocks: 1,
            block_size: 16,
            n_kv_heads: 1,
            head_dim: 2,
        };
        let (ids, meta, max_blocks) = pass_meta(&layout, &[], &[]);
        assert!(ids.is_empty() && meta.is_empty());
        assert_eq!(max_blocks, 1);
    }
}
