//! The selection itself: guards first, then the policy, over a flat scratch of candidates.
//!
//! Each candidate keeps, for every expert `e`, the offset of its first pending token routed to `e`
//! (within its chunk cap). The longest prefix whose experts lie in a set `A` is then the smallest
//! such offset over the experts outside `A`: O(experts) per candidate, with no per-token work after
//! the one scan that fills the offsets. Everything here reuses the scratch buffers, so a step
//! allocates nothing once the batcher has warmed up.

use super::{BatchPolicy, BatcherConfig, PendingView, Reason, Scheduled, StepPlan};
use crate::engine::SeqId;
use crate::error::{Error, Result};
use crate::route::{ExpertId, ExpertSet, RouteScope};

const UNSET: u32 = u32::MAX;

/// Why a candidate must run this step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Urgency {
    /// It may wait.
    None,
    /// Its wait would pass the maximum; ready since this time.
    MaxWait(f64),
    /// Its deadline is near; the deadline.
    Deadline(f64),
}

#[derive(Debug, Clone)]
struct Item {
    seq: SeqId,
    cap: u32,
    prefill: bool,
    arrival: f64,
    ready_since: f64,
    waited: f64,
    urgency: Urgency,
    taken: u32,
    reason: Reason,
}

/// Reusable buffers of one batcher.
#[derive(Debug, Clone, Default)]
pub(super) struct Scratch {
    items: Vec<Item>,
    firsts: Vec<u32>,
    experts: usize,
    order: Vec<usize>,
    /// Some pending token's route is not known ahead (an in-model router).
    unknown: bool,
}

impl Scratch {
    pub(super) fn clear(&mut self) {
        self.items.clear();
        self.firsts.clear();
        self.experts = 0;
        self.unknown = false;
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn push(
        &mut self,
        view: &PendingView<'_>,
        cap: usize,
        arrival: f64,
        ready_since: f64,
        waited: f64,
        urgency: Urgency,
    ) -> Result<()> {
        let ne = view.routes.num_experts();
        if self.experts == 0 {
            self.experts = ne;
        } else if ne != self.experts {
            return Err(Error::InvalidArgument(format!(
                "sequence {} routes over {ne} experts, others over {}",
                view.seq, self.experts
            )));
        }
        // Tokens past the known routes (an in-model router routes as the layers run) mark no
        // expert: the step cannot be grouped by them, and `select` falls back to decode-first.
        let known = view.routes.len().saturating_sub(view.route_offset).min(cap);
        self.unknown |= known < cap;
        let base = self.firsts.len();
        self.firsts.resize(base + ne, UNSET);
        let first = &mut self.firsts[base..];
        let mut seen = 0;
        for t in 0..known {
            let token = view.route_offset + t;
            let mut mark = |e: ExpertId| {
                let f = &mut first[e as usize];
                if *f == UNSET {
                    *f = t as u32;
                    seen += 1;
                }
            };
            match view.routes.scope() {
                RouteScope::AllLayers => {
                    for &e in view.routes.route(token, 0).experts() {
                        mark(e);
                    }
                }
                RouteScope::PerLayer(n) => {
                    for l in 0..n {
                        for &e in view.routes.route(token, l).experts() {
                            mark(e);
                        }
                    }
                }
            }
            if seen == ne {
                break;
            }
        }
        self.items.push(Item {
            seq: view.seq,
            cap: cap as u32,
            prefill: view.prefill,
            arrival,
            ready_since,
            waited,
            urgency,
            taken: 0,
            reason: Reason::Policy,
        });
        Ok(())
    }

    fn first(&self, i: usize) -> &[u32] {
        &self.firsts[i * self.experts..(i + 1) * self.experts]
    }

    /// Longest prefix of item `i` (within its cap) whose experts all lie in `allowed`.
    fn fit(&self, i: usize, allowed: &ExpertSet) -> u32 {
        let mut n = self.items[i].cap;
        for (e, &f) in self.first(i).iter().enumerate() {
            if f < n && !allowed.contains(e as ExpertId) {
                n = f;
            }
        }
        n
    }

    /// The experts of item `i`'s first `n` tokens.
    fn experts_of(&self, i: usize, n: u32, out: &mut ExpertSet) {
        for (e, &f) in self.first(i).iter().enumerate() {
            if f < n {
                out.insert(e as ExpertId);
            }
        }
    }

    /// Takes `n` more tokens of item `i` for `reason`.
    fn take(&mut self, i: usize, n: u32, reason: Reason, used: &mut ExpertSet, budget: &mut u32) {
        let n = n.min(*budget).min(self.items[i].cap - self.items[i].taken);
        if n == 0 {
            return;
        }
        if self.items[i].taken == 0 {
            self.items[i].reason = reason;
        }
        self.items[i].taken += n;
        *budget -= n;
        let taken = self.items[i].taken;
        self.experts_of(i, taken, used);
    }
}

fn loads(set: &ExpertSet, resident: &ExpertSet) -> usize {
    set.iter().filter(|e| !resident.contains(*e)).count()
}

/// Fills `out` with the step's chunks from the candidates in `s`.
pub(super) fn select(
    cfg: &BatcherConfig,
    s: &mut Scratch,
    resident: &ExpertSet,
    out: &mut StepPlan,
) {
    let mut budget = cfg.max_batch_tokens.min(u32::MAX as usize) as u32;
    let mut used = ExpertSet::default();

    // Guards 3 and 4: due requests first, one token each, then as much more as fits.
    s.order.clear();
    s.order
        .extend((0..s.items.len()).filter(|&i| s.items[i].urgency != Urgency::None));
    let items = &s.items;
    s.order.sort_by(|&a, &b| {
        let key = |i: usize| match items[i].urgency {
            Urgency::MaxWait(t) => (0, t, items[i].arrival),
            Urgency::Deadline(d) => (1, d, items[i].arrival),
            Urgency::None => (2, 0.0, 0.0),
        };
        key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let due = std::mem::take(&mut s.order);
    for pass in [1u32, u32::MAX] {
        for &i in &due {
            let reason = match s.items[i].urgency {
                Urgency::Deadline(_) => Reason::Deadline,
                _ => Reason::MaxWait,
            };
            s.take(i, pass, reason, &mut used, &mut budget);
        }
    }
    s.order = due;

    let free: Vec<usize> = (0..s.items.len())
        .filter(|&i| s.items[i].urgency == Urgency::None)
        .collect();
    // Without every route known ahead, grouping by expert has nothing sound to group by.
    let policy = match cfg.policy {
        BatchPolicy::ExpertAware if s.unknown => BatchPolicy::DecodeFirst,
        p => p,
    };
    match policy {
        BatchPolicy::ExpertAware => expert_aware(cfg, s, &free, resident, &mut used, &mut budget),
        p => ordered(cfg, p, s, free, resident, &mut used, &mut budget),
    }

    // Progress: the load budget must never leave a step empty while work exists.
    if s.items.iter().all(|it| it.taken == 0) && !s.items.is_empty() {
        let oldest = (0..s.items.len())
            .min_by(|&a, &b| {
                let (x, y) = (&s.items[a], &s.items[b]);
                (x.arrival, x.seq)
                    .partial_cmp(&(y.arrival, y.seq))
                    .unwrap_or(std::cmp::Ordering::Equal)
            })
            .expect("non-empty");
        s.take(oldest, u32::MAX, Reason::Progress, &mut used, &mut budget);
    }

    out.experts = ExpertSet::default();
    for (i, it) in s.items.iter().enumerate() {
        if it.taken > 0 {
            s.experts_of(i, it.taken, &mut out.experts);
            out.tokens += it.taken as usize;
            out.chunks.push(Scheduled {
                seq: it.seq,
                tokens: it.taken as usize,
                prefill: it.prefill,
                reason: it.reason,
                waited: it.waited,
            });
        }
    }
}

/// fcfs, decode-first and prefill-first: a fixed order, each request as far as budgets allow.
fn ordered(
    cfg: &BatcherConfig,
    policy: BatchPolicy,
    s: &mut Scratch,
    mut free: Vec<usize>,
    resident: &ExpertSet,
    used: &mut ExpertSet,
    budget: &mut u32,
) {
    let items = &s.items;
    let class = |i: usize| match policy {
        BatchPolicy::DecodeFirst => items[i].prefill as u8,
        BatchPolicy::PrefillFirst => !items[i].prefill as u8,
        _ => 0,
    };
    free.sort_by(|&a, &b| {
        (class(a), items[a].arrival, items[a].seq)
            .partial_cmp(&(class(b), items[b].arrival, items[b].seq))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for i in free {
        if *budget == 0 {
            break;
        }
        let full = s.items[i].cap.min(*budget);
        let n = match cfg.max_expert_loads {
            None => full,
            Some(max) => {
                let mut with = *used;
                s.experts_of(i, full, &mut with);
                if loads(&with, resident) <= max {
                    full
                } else {
                    // Only the prefix that needs no expert beyond those already paid for.
                    s.fit(i, &used.union(resident))
                }
            }
        };
        s.take(i, n, Reason::Policy, used, budget);
    }
}

/// Algorithm 1, corrected and generalised to in-order prefixes (see the module documentation).
fn expert_aware(
    cfg: &BatcherConfig,
    s: &mut Scratch,
    free: &[usize],
    resident: &ExpertSet,
    used: &mut ExpertSet,
    budget: &mut u32,
) {
    let ne = s.experts;
    let mut chosen = *used;
    let mut gains = vec![0u64; ne];
    loop {
        gains.iter_mut().for_each(|g| *g = 0);
        let mut total: u64 = 0;
        for &i in free {
            let cap = s.items[i].cap;
            let (mut f, mut second, mut blocker) = (cap, cap, usize::MAX);
            for (e, &fe) in s.first(i).iter().enumerate() {
                if chosen.contains(e as ExpertId) {
                    continue;
                }
                if fe < f {
                    second = f;
                    f = fe;
                    blocker = e;
                } else if fe < second {
                    second = fe;
                }
            }
            total += f as u64;
            if blocker != usize::MAX {
                gains[blocker] += (second - f) as u64;
            }
        }
        if total >= *budget as u64 {
            break;
        }
        let loads_left = cfg
            .max_expert_loads
            .map(|m| m.saturating_sub(loads(&chosen, resident)));
        let best = (0..ne)
            .filter(|&e| gains[e] > 0)
            .filter(|&e| resident.contains(e as ExpertId) || loads_left != Some(0))
            .max_by_key(|&e| {
                (
                    gains[e],
                    resident.contains(e as ExpertId),
                    std::cmp::Reverse(e),
                )
            });
        match best {
            Some(e) => {
                chosen.insert(e as ExpertId);
            }
            None => break,
        }
    }
    // Fill oldest first; the last prefix is split to meet the budget exactly.
    let mut order: Vec<usize> = free.to_vec();
    let items = &s.items;
    order.sort_by(|&a, &b| {
        (items[a].ready_since, items[a].arrival, items[a].seq)
            .partial_cmp(&(items[b].ready_since, items[b].arrival, items[b].seq))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for i in order {
        if *budget == 0 {
            break;
        }
        let n = s.fit(i, &chosen);
        s.take(i, n, Reason::Policy, used, budget);
    }
}
