//! The expert cache: which (layer, expert) units are resident in a fixed set of slots.
//!
//! Read-ME keeps attention, embeddings, norms, the router and any shared (residual) expert part
//! resident for good; only routed experts are cached, one [`Unit`] = one expert of one layer, one
//! fixed-size slot each. [`ExpertCache`] is the bookkeeping (residency, pins, eviction, counters) and
//! touches no bytes, so the simulator drives it directly; [`ExpertStore`] pairs it with a
//! [`MemoryBackend`] that really copies expert bytes into slot buffers.
//!
//! Eviction ([`EvictionPolicy`]): `lru`, `lfu` (access counts over the whole run, so a hot expert
//! evicted once comes back with its history), `random` (seeded) and `belady`: the resident unit whose
//! next use is farthest, where next uses come from the scheduler's lookahead
//! ([`ExpertCache::set_next_use`]); ties, including units with no known next use, go to the least
//! recently used. `belady-decay` is the same inside the lookahead, and beyond it (units with no
//! known next use, the common case when a model routes each layer from its own hidden state and
//! only a few layers ahead are predicted) evicts the unit of lowest **decayed frequency** instead
//! of the least recently used: every access adds 1 to the unit's count, which halves every
//! `4 x experts` accesses of its layer ([`DECAY_HALF_LIFE_PER_EXPERT`]), so an expert a layer
//! keeps coming back to survives a burst of one-off experts that LRU would keep instead; ties by
//! LRU. It is a policy of its own rather than `belady`'s fallback because Read-ME's lookahead
//! leaves most units without a known next use too, and changing `belady` would change its measured
//! figures. Units used by the step in flight are pinned ([`ExpertCache::pin`], and every
//! [`ExpertCache::access`]) and never evicted: asking for a slot when every candidate is pinned is a
//! [`Error::Capacity`] error, which means the capacity is smaller than one step's experts. An
//! executor that computes a layer's experts one after the other may release a unit as soon as its
//! compute is done ([`ExpertCache::unpin`]; the replay does, see `replay::layer`), so a step can use
//! more experts at a layer than the layer has slots; [`ExpertCache::unpin_all`] ends the step.
//!
//! A capacity may be split evenly across layers ([`ExpertCache::with_layer_quota`]): with Read-ME's
//! shared routes every layer sees the same experts, and a per-layer quota is what "N experts per
//! layer" means in the paper's Table 4.

mod backend;
pub mod prefetch;

pub use backend::{HostMemory, LoadTicket, MemoryBackend};
pub use prefetch::{PlannedLoad, PrefetchPlanner, StepExperts};

use std::str::FromStr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::route::ExpertId;

/// One cacheable piece of weights: the routed expert `expert` of layer `layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Unit {
    /// Backbone layer.
    pub layer: u16,
    /// Expert within the layer.
    pub expert: ExpertId,
}

impl Unit {
    /// The unit of `expert` at `layer`.
    pub fn new(layer: usize, expert: ExpertId) -> Self {
        Unit {
            layer: layer as u16,
            expert,
        }
    }
}

/// How the cache picks a victim when it needs a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictionPolicy {
    /// Least recently used.
    Lru,
    /// Least frequently used (whole-run access counts; ties by LRU).
    Lfu,
    /// Uniformly random among unpinned candidates, from a seeded generator.
    Random,
    /// Farthest next use according to the lookahead (ties by LRU).
    Belady,
    /// Farthest next use; among equal next uses (no known use included) the lowest decayed
    /// access frequency, then LRU.
    BeladyDecay,
}

impl EvictionPolicy {
    /// Every policy, in the order reports list them.
    pub const ALL: [EvictionPolicy; 5] = [
        EvictionPolicy::Random,
        EvictionPolicy::Lru,
        EvictionPolicy::Lfu,
        EvictionPolicy::Belady,
        EvictionPolicy::BeladyDecay,
    ];

    /// Whether the policy reads the lookahead's next uses ([`ExpertCache::set_next_use`]).
    pub fn reads_next_use(self) -> bool {
        matches!(self, EvictionPolicy::Belady | EvictionPolicy::BeladyDecay)
    }

    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            EvictionPolicy::Lru => "lru",
            EvictionPolicy::Lfu => "lfu",
            EvictionPolicy::Random => "random",
            EvictionPolicy::Belady => "belady",
            EvictionPolicy::BeladyDecay => "belady-decay",
        }
    }
}

impl FromStr for EvictionPolicy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lru" => Ok(EvictionPolicy::Lru),
            "lfu" => Ok(EvictionPolicy::Lfu),
            "random" => Ok(EvictionPolicy::Random),
            "belady" => Ok(EvictionPolicy::Belady),
            "belady-decay" => Ok(EvictionPolicy::BeladyDecay),
            other => Err(Error::InvalidArgument(format!(
                "unknown cache policy `{other}` (expected lru, lfu, random, belady or \
                 belady-decay)"
            ))),
        }
    }
}

impl std::fmt::Display for EvictionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cache size, in whichever unit the operator has at hand.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CacheCapacity {
    /// A number of slots (units).
    Slots(usize),
    /// A number of bytes; rounded down to whole slots.
    Bytes(u64),
    /// A fraction (0, 1] of the backend's free memory; rounded down to whole slots.
    FractionOfFree(f64),
}

impl CacheCapacity {
    /// Whole slots of `slot_bytes` this capacity allows, given `free_bytes` of backend memory.
    pub fn slots(self, slot_bytes: u64, free_bytes: u64) -> Result<usize> {
        if slot_bytes == 0 {
            return Err(Error::InvalidArgument("an expert slot of 0 bytes".into()));
        }
        let n = match self {
            CacheCapacity::Slots(n) => n,
            CacheCapacity::Bytes(b) => (b / slot_bytes) as usize,
            CacheCapacity::FractionOfFree(f) => {
                if !(f > 0.0 && f <= 1.0) {
                    return Err(Error::InvalidArgument(format!(
                        "cache fraction {f} must be in (0, 1]"
                    )));
                }
                ((free_bytes as f64 * f) as u64 / slot_bytes) as usize
            }
        };
        if n == 0 {
            return Err(Error::Capacity(format!(
                "cache capacity {self} holds no expert of {slot_bytes} bytes"
            )));
        }
        Ok(n)
    }
}

impl std::fmt::Display for CacheCapacity {
    /// As an operator writes it: `3 slots`, `512 bytes`, `50% of free memory`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CacheCapacity::Slots(n) => write!(f, "{n} slots"),
            CacheCapacity::Bytes(b) => write!(f, "{b} bytes"),
            CacheCapacity::FractionOfFree(x) => write!(f, "{}% of free memory", x * 100.0),
        }
    }
}

/// How many routed experts a backend may keep resident, as operators give it (`--expert-cache`,
/// Triton's `cache_capacity`, `PREGATE_EXPERT_CACHE`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ExpertCapacity {
    /// Every expert resident.
    All,
    /// This many experts of each layer (the paper's "N of 7").
    PerLayer(usize),
    /// A total in slots, bytes or a fraction of the backend's free memory.
    Total(CacheCapacity),
}

impl ExpertCapacity {
    /// The cache this capacity asks for over `layers` x `experts` units of `unit_bytes`;
    /// `free_bytes` is asked only for a fraction of free memory.
    pub fn build_cache(
        self,
        layers: usize,
        experts: usize,
        unit_bytes: u64,
        policy: EvictionPolicy,
        free_bytes: impl FnOnce() -> Result<u64>,
    ) -> Result<ExpertCache> {
        match self {
            ExpertCapacity::All => {
                ExpertCache::new(layers, experts, layers * experts, unit_bytes, policy, 0)
            }
            ExpertCapacity::PerLayer(n) => {
                ExpertCache::with_layer_quota(layers, experts, n, unit_bytes, policy, 0)
            }
            ExpertCapacity::Total(c) => {
                let slots = c.slots(unit_bytes, free_bytes()?)?;
                ExpertCache::new(layers, experts, slots, unit_bytes, policy, 0)
            }
        }
    }
}

impl FromStr for ExpertCapacity {
    type Err = Error;

    /// `all`, `N` (experts per layer, N >= 1), a size (`512MiB`, `1.5GiB`, `64KiB`, `4096B`) or a
    /// fraction of free memory (`0.5` or `50%`).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::InvalidArgument(format!(
                "expert cache capacity `{s}`: expected all, N (experts per layer), a size \
                 (512MiB, 2GiB) or a fraction of free memory (0.5, 50%)"
            ))
        };
        let fraction = |f: f64| {
            (f > 0.0 && f <= 1.0)
                .then_some(ExpertCapacity::Total(CacheCapacity::FractionOfFree(f)))
                .ok_or_else(bad)
        };
        let t = s.trim();
        if t == "all" {
            return Ok(ExpertCapacity::All);
        }
        if let Some(p) = t.strip_suffix('%') {
            let f: f64 = p.trim().parse().map_err(|_| bad())?;
            return fraction(f / 100.0);
        }
        for (suffix, unit) in [
            ("GiB", 1u64 << 30),
            ("MiB", 1 << 20),
            ("KiB", 1 << 10),
            ("B", 1),
        ] {
            if let Some(n) = t.strip_suffix(suffix) {
                let n: f64 = n.trim().parse().map_err(|_| bad())?;
                if !(n.is_finite() && n > 0.0) {
                    return Err(bad());
                }
                let bytes = n * unit as f64;
                // 2^64: past it the cast would clamp to u64::MAX; say so instead.
                if bytes >= 18_446_744_073_709_551_616.0 {
                    return Err(Error::InvalidArgument(format!(
                        "expert cache capacity `{s}` is too large"
                    )));
                }
                return Ok(ExpertCapacity::Total(CacheCapacity::Bytes(bytes as u64)));
            }
        }
        if let Ok(n) = t.parse::<usize>() {
            return if n > 0 {
                Ok(ExpertCapacity::PerLayer(n))
            } else {
                Err(bad())
            };
        }
        fraction(t.parse().map_err(|_| bad())?)
    }
}

/// Counters of one cache, monotonically increasing (the metrics module reads deltas).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Accesses that found their unit resident.
    pub hits: u64,
    /// Accesses that had to load their unit.
    pub misses: u64,
    /// Units evicted to make room.
    pub evictions: u64,
    /// Loads issued (misses plus prefetches).
    pub loads: u64,
    /// Bytes copied into slots.
    pub bytes_loaded: u64,
}

impl CacheStats {
    /// Hits over accesses (0 when nothing was accessed).
    pub fn hit_ratio(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

/// The outcome of [`ExpertCache::access`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// The unit is resident in `slot`.
    Hit {
        /// Its slot.
        slot: usize,
    },
    /// The unit was assigned `slot` and must be loaded there; `evicted` was its previous tenant.
    Miss {
        /// The slot to load into.
        slot: usize,
        /// The unit that lost the slot, if it held one.
        evicted: Option<Unit>,
    },
}

const NONE: u32 = u32::MAX;

/// `belady-decay`'s half-life, in accesses of a unit's layer per expert of the layer: a count
/// halves every `4 x experts` accesses of its layer (a few rounds through the layer's experts,
/// whatever the model's width).
pub const DECAY_HALF_LIFE_PER_EXPERT: u64 = 4;
/// Next-use value of a unit the lookahead does not mention.
pub const NEVER: u64 = u64::MAX;

/// Residency, pins and eviction over `slots` fixed-size slots of (layer, expert) units.
#[derive(Debug, Clone)]
pub struct ExpertCache {
    layers: usize,
    experts: usize,
    unit_bytes: u64,
    policy: EvictionPolicy,
    layer_quota: Option<usize>,
    slot_unit: Vec<u32>,
    free_slots: Vec<u32>,
    unit_slot: Vec<u32>,
    layer_resident: Vec<u32>,
    last_use: Vec<u64>,
    uses: Vec<u64>,
    /// Decayed access count of each unit as of `decay_at` (its layer's access clock).
    decayed: Vec<f64>,
    decay_at: Vec<u64>,
    /// Accesses of each layer: the clock of the decayed counts.
    layer_ticks: Vec<u64>,
    next_use: Vec<u64>,
    pin_epoch: Vec<u64>,
    epoch: u64,
    tick: u64,
    rng: ChaCha8Rng,
    stats: CacheStats,
}

impl ExpertCache {
    /// A cache of `slots` slots over `layers` x `experts` units of `unit_bytes` bytes each.
    pub fn new(
        layers: usize,
        experts: usize,
        slots: usize,
        unit_bytes: u64,
        policy: EvictionPolicy,
        seed: u64,
    ) -> Result<Self> {
        if layers == 0 || experts == 0 {
            return Err(Error::InvalidArgument(format!(
                "an expert cache over {layers} layers x {experts} experts"
            )));
        }
        if layers > u16::MAX as usize || experts > crate::route::MAX_EXPERTS {
            return Err(Error::InvalidArgument(format!(
                "{layers} layers x {experts} experts is beyond what the cache indexes"
            )));
        }
        if slots == 0 {
            return Err(Error::Capacity(
                "an expert cache needs at least one slot".into(),
            ));
        }
        let units = layers * experts;
        let slots = slots.min(units);
        Ok(ExpertCache {
            layers,
            experts,
            unit_bytes,
            policy,
            layer_quota: None,
            slot_unit: vec![NONE; slots],
            free_slots: (0..slots as u32).rev().collect(),
            unit_slot: vec![NONE; units],
            layer_resident: vec![0; layers],
            last_use: vec![0; units],
            uses: vec![0; units],
            decayed: vec![0.0; units],
            decay_at: vec![0; units],
            layer_ticks: vec![0; layers],
            next_use: vec![NEVER; units],
            pin_epoch: vec![0; units],
            epoch: 1,
            tick: 0,
            rng: ChaCha8Rng::seed_from_u64(seed),
            stats: CacheStats::default(),
        })
    }

    /// A cache of `per_layer` slots for each of `layers` layers: the paper's "N experts per layer".
    /// A layer whose quota is full evicts one of its own units.
    pub fn with_layer_quota(
        layers: usize,
        experts: usize,
        per_layer: usize,
        unit_bytes: u64,
        policy: EvictionPolicy,
        seed: u64,
    ) -> Result<Self> {
        if per_layer == 0 {
            return Err(Error::Capacity(
                "a cache of 0 experts per layer cannot run any step".into(),
            ));
        }
        let per_layer = per_layer.min(experts);
        let mut cache = ExpertCache::new(
            layers,
            experts,
            per_layer * layers,
            unit_bytes,
            policy,
            seed,
        )?;
        cache.layer_quota = Some(per_layer);
        Ok(cache)
    }

    /// Layers covered.
    pub fn layers(&self) -> usize {
        self.layers
    }

    /// Experts per layer covered.
    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slot_unit.len()
    }

    /// The per-layer limit, if any.
    pub fn layer_quota(&self) -> Option<usize> {
        self.layer_quota
    }

    /// Bytes of one unit.
    pub fn unit_bytes(&self) -> u64 {
        self.unit_bytes
    }

    /// The eviction policy.
    pub fn policy(&self) -> EvictionPolicy {
        self.policy
    }

    /// Units resident now.
    pub fn resident(&self) -> usize {
        self.slot_unit.len() - self.free_slots.len()
    }

    /// The counters so far.
    pub fn stats(&self) -> CacheStats {
        self.stats
    }

    fn index(&self, u: Unit) -> usize {
        u.layer as usize * self.experts + u.expert as usize
    }

    fn unit_at(&self, i: usize) -> Unit {
        Unit::new(i / self.experts, (i % self.experts) as ExpertId)
    }

    fn check(&self, u: Unit) -> Result<usize> {
        if u.layer as usize >= self.layers || u.expert as usize >= self.experts {
            return Err(Error::InvalidArgument(format!(
                "unit (layer {}, expert {}) is outside {} layers x {} experts",
                u.layer, u.expert, self.layers, self.experts
            )));
        }
        Ok(self.index(u))
    }

    /// Whether `u` is resident, and in which slot.
    pub fn slot_of(&self, u: Unit) -> Option<usize> {
        let i = self.check(u).ok()?;
        let s = self.unit_slot[i];
        (s != NONE).then_some(s as usize)
    }

    /// The unit in `slot`, if any.
    pub fn unit_in(&self, slot: usize) -> Option<Unit> {
        let i = *self.slot_unit.get(slot)?;
        (i != NONE).then(|| self.unit_at(i as usize))
    }

    /// The experts of `layer` resident now.
    pub fn resident_experts(&self, layer: usize) -> crate::route::ExpertSet {
        let mut set = crate::route::ExpertSet::default();
        if layer < self.layers {
            for e in 0..self.experts {
                if self.unit_slot[layer * self.experts + e] != NONE {
                    set.insert(e as ExpertId);
                }
            }
        }
        set
    }

    /// The experts resident at every layer: what a step can use without any load when routes are
    /// shared by all layers (the batcher's resident set).
    pub fn resident_in_every_layer(&self) -> crate::route::ExpertSet {
        let mut set = crate::route::ExpertSet::default();
        for e in 0..self.experts {
            if (0..self.layers).all(|l| self.unit_slot[l * self.experts + e] != NONE) {
                set.insert(e as ExpertId);
            }
        }
        set
    }

    /// Records the lookahead's next use of `u` (any monotone clock: a step or token index).
    /// [`NEVER`] means no known use. Only `belady` reads it.
    pub fn set_next_use(&mut self, u: Unit, when: u64) -> Result<()> {
        let i = self.check(u)?;
        self.next_use[i] = when;
        Ok(())
    }

    /// Sets the next use of every unit of `layer` at once from `f(expert)`.
    pub fn set_layer_next_use(&mut self, layer: usize, mut f: impl FnMut(ExpertId) -> u64) {
        if layer >= self.layers {
            return;
        }
        let base = layer * self.experts;
        for e in 0..self.experts {
            self.next_use[base + e] = f(e as ExpertId);
        }
    }

    /// The recorded next use of `u`.
    pub fn next_use(&self, u: Unit) -> u64 {
        self.check(u).map(|i| self.next_use[i]).unwrap_or(NEVER)
    }

    /// Pins `u` until [`ExpertCache::unpin_all`]: the step in flight uses it.
    pub fn pin(&mut self, u: Unit) -> Result<()> {
        let i = self.check(u)?;
        self.pin_epoch[i] = self.epoch;
        Ok(())
    }

    /// Releases the pin of `u` (its compute in the step in flight is done).
    pub fn unpin(&mut self, u: Unit) {
        if let Ok(i) = self.check(u) {
            self.pin_epoch[i] = 0;
        }
    }

    /// Whether `u` is pinned.
    pub fn is_pinned(&self, u: Unit) -> bool {
        self.check(u)
            .map(|i| self.pin_epoch[i] == self.epoch)
            .unwrap_or(false)
    }

    /// Releases every pin (the step in flight has finished); O(1).
    pub fn unpin_all(&mut self) {
        self.epoch += 1;
    }

    /// Uses `u`: a hit, or a miss that assigns it a slot (evicting by the policy) and counts a load.
    /// Pins `u` for the step in flight.
    pub fn access(&mut self, u: Unit) -> Result<Lookup> {
        let i = self.check(u)?;
        self.tick += 1;
        let out = if self.unit_slot[i] != NONE {
            self.stats.hits += 1;
            Lookup::Hit {
                slot: self.unit_slot[i] as usize,
            }
        } else {
            // Counted once admitted: an access refused for want of an unpinned slot is retried
            // by the caller, and the retry is the same miss.
            let (slot, evicted) = self.admit(i)?;
            self.stats.misses += 1;
            Lookup::Miss { slot, evicted }
        };
        self.last_use[i] = self.tick;
        self.uses[i] += 1;
        let layer = i / self.experts;
        self.layer_ticks[layer] += 1;
        self.decayed[i] = self.decayed_count(i) + 1.0;
        self.decay_at[i] = self.layer_ticks[layer];
        self.pin_epoch[i] = self.epoch;
        Ok(out)
    }

    /// Loads `u` ahead of its use (a prefetch): no hit or miss is counted, the unit is not pinned and
    /// its recency is that of the load. Returns `None` if it was already resident.
    pub fn prefetch(&mut self, u: Unit) -> Result<Option<Lookup>> {
        let i = self.check(u)?;
        if self.unit_slot[i] != NONE {
            return Ok(None);
        }
        self.tick += 1;
        let (slot, evicted) = self.admit(i)?;
        self.last_use[i] = self.tick;
        Ok(Some(Lookup::Miss { slot, evicted }))
    }

    /// The decayed access count of unit index `i` now (see [`DECAY_HALF_LIFE_PER_EXPERT`]).
    fn decayed_count(&self, i: usize) -> f64 {
        let age = self.layer_ticks[i / self.experts] - self.decay_at[i];
        let half_life = (DECAY_HALF_LIFE_PER_EXPERT * self.experts as u64) as f64;
        self.decayed[i] * (-(age as f64) / half_life).exp2()
    }

    /// The decayed access count of `u` now (what `belady-decay` ranks units without a known next
    /// use by).
    pub fn decayed_uses(&self, u: Unit) -> f64 {
        self.check(u).map(|i| self.decayed_count(i)).unwrap_or(0.0)
    }

    /// Finds `unit index i` a slot, evicting if needed; counts the load.
    fn admit(&mut self, i: usize) -> Result<(usize, Option<Unit>)> {
        let layer = i / self.experts;
        let quota_full = self
            .layer_quota
            .is_some_and(|q| self.layer_resident[layer] as usize >= q);
        let (slot, evicted) = if !quota_full && !self.free_slots.is_empty() {
            (
                self.free_slots.pop().expect("checked non-empty") as usize,
                None,
            )
        } else {
            let victim = self.victim(if quota_full { Some(layer) } else { None })?;
            let slot = self.unit_slot[victim] as usize;
            self.unit_slot[victim] = NONE;
            self.layer_resident[victim / self.experts] -= 1;
            self.stats.evictions += 1;
            (slot, Some(self.unit_at(victim)))
        };
        self.slot_unit[slot] = i as u32;
        self.unit_slot[i] = slot as u32;
        self.layer_resident[layer] += 1;
        self.stats.loads += 1;
        self.stats.bytes_loaded += self.unit_bytes;
        Ok((slot, evicted))
    }

    /// The unit index the policy evicts, among unpinned residents (of `layer` only, if given).
    fn victim(&mut self, layer: Option<usize>) -> Result<usize> {
        let range = match layer {
            Some(l) => l * self.experts..(l + 1) * self.experts,
            None => 0..self.unit_slot.len(),
        };
        let epoch = self.epoch;
        let candidates = range
            .clone()
            .filter(|&i| self.unit_slot[i] != NONE && self.pin_epoch[i] != epoch);
        let best = match self.policy {
            EvictionPolicy::Lru => candidates.min_by_key(|&i| self.last_use[i]),
            EvictionPolicy::Lfu => candidates.min_by_key(|&i| (self.uses[i], self.last_use[i])),
            EvictionPolicy::Belady => {
                candidates.min_by_key(|&i| (std::cmp::Reverse(self.next_use[i]), self.last_use[i]))
            }
            EvictionPolicy::BeladyDecay => candidates.min_by(|&a, &b| {
                self.next_use[b]
                    .cmp(&self.next_use[a])
                    .then(self.decayed_count(a).total_cmp(&self.decayed_count(b)))
                    .then(self.last_use[a].cmp(&self.last_use[b]))
            }),
            EvictionPolicy::Random => {
                let n = candidates.count();
                if n == 0 {
                    None
                } else {
                    let k = self.rng.random_range(0..n);
                    let epoch = self.epoch;
                    range
                        .filter(|&i| self.unit_slot[i] != NONE && self.pin_epoch[i] != epoch)
                        .nth(k)
                }
            }
        };
        best.ok_or_else(|| {
            let scope = match layer {
                Some(l) => format!("layer {l}'s {} slots", self.layer_quota.unwrap_or(0)),
                None => format!("all {} slots", self.slot_unit.len()),
            };
            Error::Capacity(format!(
                "{scope} are pinned by the step in flight: the cache capacity is smaller than one \
                 step's experts"
            ))
        })
    }
}

/// An [`ExpertCache`] over real memory: misses copy the unit's bytes through the backend.
pub struct ExpertStore<B: MemoryBackend> {
    cache: ExpertCache,
    memory: B,
}

/// Where the bytes of a unit come from (the model's mapped weights).
pub trait ExpertSource {
    /// The packed bytes of `unit` (at most the slot size).
    fn unit_bytes(&self, unit: Unit) -> Result<&[u8]>;
}

impl<B: MemoryBackend> ExpertStore<B> {
    /// Allocates the cache's slots in `memory`.
    pub fn new(cache: ExpertCache, mut memory: B) -> Result<Self> {
        let slot_bytes = usize::try_from(cache.unit_bytes())
            .map_err(|_| Error::Capacity("expert slot larger than the address space".into()))?;
        memory.allocate(cache.capacity(), slot_bytes)?;
        Ok(ExpertStore { cache, memory })
    }

    /// Makes `unit` resident (copying it on a miss) and returns its slot and the copy's ticket.
    pub fn fetch(
        &mut self,
        unit: Unit,
        source: &dyn ExpertSource,
    ) -> Result<(usize, Option<LoadTicket>)> {
        match self.cache.access(unit)? {
            Lookup::Hit { slot } => Ok((slot, None)),
            Lookup::Miss { slot, .. } => {
                let t = self.memory.load(slot, source.unit_bytes(unit)?)?;
                Ok((slot, Some(t)))
            }
        }
    }

    /// The bookkeeping.
    pub fn cache(&self) -> &ExpertCache {
        &self.cache
    }

    /// The bookkeeping, mutably (pins, next uses).
    pub fn cache_mut(&mut self) -> &mut ExpertCache {
        &mut self.cache
    }

    /// The memory backend.
    pub fn memory(&self) -> &B {
        &self.memory
    }

    /// The memory backend, mutably (to wait on tickets).
    pub fn memory_mut(&mut self) -> &mut B {
        &mut self.memory
    }

    /// The bookkeeping and the memory at once: a layer's waves access units and load their bytes
    /// in one pass.
    pub fn parts_mut(&mut self) -> (&mut ExpertCache, &mut B) {
        (&mut self.cache, &mut self.memory)
    }
}

#[cfg(test)]
mod tests;
