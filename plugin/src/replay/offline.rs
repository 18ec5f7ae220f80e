//! Offline cache evaluation: one fixed sequence of steps through every eviction policy.
//!
//! A replay's hit ratio depends on its own history (a slower cache makes larger batches, which use
//! more experts), so comparing policies on one trace, as the paper's Table 4 does, needs a fixed
//! access sequence: the experts each step of one replay used. [`hit_ratio`] runs that sequence
//! through one layer's cache (every layer sees the same experts under Read-ME's shared routes),
//! with the simulator's step semantics (`replay/layer.rs`). `belady` is given the exact future of
//! the sequence: the offline optimum the online lookahead approximates.

use crate::cache::{EvictionPolicy, ExpertCache, NEVER};
use crate::error::Result;
use crate::route::ExpertSet;

/// Hit ratio of `policy` with `per_layer` slots over the per-step expert sets `steps`.
pub fn hit_ratio(
    steps: &[ExpertSet],
    experts: usize,
    per_layer: usize,
    policy: EvictionPolicy,
    seed: u64,
) -> Result<f64> {
    let mut cache = ExpertCache::with_layer_quota(1, experts, per_layer, 1, policy, seed)?;
    // next[s * experts + e]: the first step after s that uses e.
    let mut next = vec![NEVER; steps.len() * experts];
    let mut upcoming = vec![NEVER; experts];
    for (s, set) in steps.iter().enumerate().rev() {
        next[s * experts..(s + 1) * experts].copy_from_slice(&upcoming);
        for e in set.iter() {
            if (e as usize) < experts {
                upcoming[e as usize] = s as u64;
            }
        }
    }
    let mut outcomes = Vec::with_capacity(experts);
    let mut future = vec![NEVER; experts];
    for (s, set) in steps.iter().enumerate() {
        for (f, &n) in future.iter_mut().zip(&next[s * experts..(s + 1) * experts]) {
            *f = if n == NEVER { NEVER } else { n - s as u64 };
        }
        super::layer::access_layer(&mut cache, 0, set, &future, &mut outcomes)?;
        cache.unpin_all();
    }
    Ok(cache.stats().hit_ratio())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u16]) -> ExpertSet {
        let mut s = ExpertSet::default();
        v.iter().for_each(|&e| {
            s.insert(e);
        });
        s
    }

    #[test]
    fn belady_beats_lru_on_a_cyclic_pattern() {
        // 0 1 2 0 1 2 ... with 2 slots: LRU always misses, Belady keeps one of them.
        let steps: Vec<ExpertSet> = (0..30).map(|i| set(&[(i % 3) as u16])).collect();
        let lru = hit_ratio(&steps, 3, 2, EvictionPolicy::Lru, 0).unwrap();
        let opt = hit_ratio(&steps, 3, 2, EvictionPolicy::Belady, 0).unwrap();
        assert_eq!(lru, 0.0);
        assert!(opt > 0.4, "{opt}");
    }

    #[test]
    fn steps_wider_than_the_cache_run_in_rounds() {
        let steps = vec![set(&[0, 1, 2, 3]); 4];
        for p in EvictionPolicy::ALL {
            let h = hit_ratio(&steps, 4, 2, p, 1).unwrap();
            assert!((0.0..=0.5).contains(&h), "{p}: {h}");
        }
    }
}
