//! The CPU backend: the whole backbone on the host, in f32. It is the reference every other backend
//! is checked against, and a usable backend for small models.
//!
//! The routed experts are the CPU expert runtime's ([`CpuExperts`]), called once per layer; with
//! an expert cache ([`CpuBackend::with_expert_cache`]) the runtime accounts the decisions a device
//! cache makes (see [`crate::moe`]) while the weights stay in host memory.

use std::collections::HashMap;

use rayon::prelude::*;

use super::backend::{Backend, ForwardChunk, Lookahead, SeqId, StepRoutes};
use crate::cache::{EvictionPolicy, ExpertCache, ExpertCapacity};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::weights::{LayerWeights, Matrix};
use crate::moe::{step_experts, CpuExperts};
use crate::ops::{attention, matmul_t, rms_norm, AttentionShape, RopeTable};

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

/// The CPU backend.
pub struct CpuBackend {
    cfg: ModelConfig,
    w: BackboneWeights,
    rope: RopeTable,
    shape: AttentionShape,
    kv: HashMap<SeqId, SeqKv>,
    experts: CpuExperts,
}

impl CpuBackend {
    /// A backend over `weights` for `cfg`; the layers' experts move into the expert runtime.
    pub fn new(cfg: ModelConfig, mut weights: BackboneWeights) -> Result<Self> {
        let d = cfg.head_dim();
        let shape = AttentionShape {
            n_heads: cfg.num_attention_heads,
            n_kv_heads: cfg.num_kv_heads(),
            head_dim: d,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let rope = RopeTable::new(d, cfg.rope_theta, cfg.max_position_embeddings);
        let routed = weights
            .layers
            .iter_mut()
            .map(|l| std::mem::take(&mut l.experts))
            .collect();
        let shared = weights.layers.iter_mut().map(|l| l.shared.take()).collect();
        let experts = CpuExperts::new(routed, shared, cfg.hidden_size, cfg.router_top_k.max(1))?;
        Ok(CpuBackend {
            cfg,
            w: weights,
            rope,
            shape,
            kv: HashMap::new(),
            experts,
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

    /// Bytes of KV cache one token takes.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.cfg.num_hidden_layers * self.shape.n_kv_heads * self.shape.head_dim * 4
    }
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
            c.check(kv.len(), kv.max_len, vocab)?;
        }
        // Every layer's routes are checked before any KV cache changes.
        let routes = StepRoutes::of(chunks, self.w.layers.len());
        for l in 0..self.w.layers.len() {
            self.experts.check(l, routes.layer(l))?;
        }
        let total: usize = chunks.iter().map(|c| c.tokens.len()).sum();
        let mut x = Vec::with_capacity(total * hdim);
        for c in chunks {
            for &t in c.tokens {
                x.extend_from_slice(self.w.embed.row(t as usize));
            }
        }
        let mut h = vec![0.0f32; total * hdim];
        let mut q = vec![0.0f32; total * q_width];
        let mut k = vec![0.0f32; total * kv_width];
        let mut v = vec![0.0f32; total * kv_width];
        let mut att = vec![0.0f32; total * q_width];
        let mut o = vec![0.0f32; total * hdim];
        for (l, layer) in self.w.layers.iter().enumerate() {
            rms_norm(&x, &layer.input_norm, cfg.rms_norm_eps, &mut h);
            matmul_t(&h, total, &layer.q, &mut q);
            matmul_t(&h, total, &layer.k, &mut k);
            matmul_t(&h, total, &layer.v, &mut v);
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
            rms_norm(&x, &layer.post_norm, cfg.rms_norm_eps, &mut h);
            self.experts
                .forward_layer(l, &h, routes.layer(l), &mut o, false)?;
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
        rms_norm(&last, &self.w.norm, cfg.rms_norm_eps, &mut normed);
        let head = self.w.lm_head.as_ref().unwrap_or(&self.w.embed);
        let mut logits = vec![0.0f32; m * vocab];
        matmul_t(&normed, m, head, &mut logits);
        Ok(logits.chunks_exact(vocab).map(<[f32]>::to_vec).collect())
    }

    fn prepare(&mut self, lookahead: &Lookahead) -> Result<()> {
        let layers = self.cfg.num_hidden_layers;
        self.experts.plan(&step_experts(&lookahead.steps, layers))
    }

    fn expert_cache(&self) -> Option<&ExpertCache> {
        self.experts.cache()
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
}
