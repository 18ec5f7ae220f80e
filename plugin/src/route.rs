//! The route plan: which experts every token uses, known before the backbone runs.
//!
//! This is the one structure the batcher, the expert cache and every backend read. A pre-gating
//! router fills it as tokens arrive (the whole prompt at admission, then one row per decoded token),
//! so everything downstream can look ahead: the batcher groups tokens by expert, the cache evicts by
//! next use (Belady) and prefetches, and a backend permutes tokens by expert.
//!
//! A route is per token and either shared by every layer ([`RouteScope::AllLayers`], the Read-ME
//! router) or given per layer ([`RouteScope::PerLayer`], per-layer top-k or DSelect-k gates).

use std::ops::Range;

/// The most experts per layer a route can name.
pub const MAX_EXPERTS: usize = 256;
/// The most experts a token can be routed to.
pub const MAX_TOP_K: usize = 8;

/// An expert's index within its layer.
pub type ExpertId = u16;

/// One token's experts and their mixing weights at one layer (or at every layer).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TokenRoute {
    k: u8,
    experts: [ExpertId; MAX_TOP_K],
    weights: [f32; MAX_TOP_K],
}

impl TokenRoute {
    /// A top-1 route with weight 1 (Read-ME's released inference).
    pub fn single(expert: ExpertId) -> Self {
        let mut r = TokenRoute {
            k: 1,
            experts: [0; MAX_TOP_K],
            weights: [0.0; MAX_TOP_K],
        };
        r.experts[0] = expert;
        r.weights[0] = 1.0;
        r
    }

    /// A route to `experts` with `weights` (same length, 1..=[`MAX_TOP_K`], distinct experts).
    pub fn new(experts: &[ExpertId], weights: &[f32]) -> crate::Result<Self> {
        if experts.is_empty() || experts.len() > MAX_TOP_K || experts.len() != weights.len() {
            return Err(crate::Error::InvalidArgument(format!(
                "a token route needs 1..={MAX_TOP_K} experts with one weight each, got {} experts and {} weights",
                experts.len(),
                weights.len()
            )));
        }
        for (i, e) in experts.iter().enumerate() {
            if *e as usize >= MAX_EXPERTS || experts[..i].contains(e) {
                return Err(crate::Error::InvalidArgument(format!(
                    "route names expert {e} twice or beyond {MAX_EXPERTS}"
                )));
            }
        }
        let mut r = TokenRoute {
            k: experts.len() as u8,
            experts: [0; MAX_TOP_K],
            weights: [0.0; MAX_TOP_K],
        };
        r.experts[..experts.len()].copy_from_slice(experts);
        r.weights[..weights.len()].copy_from_slice(weights);
        Ok(r)
    }

    /// The experts, most heavily weighted first.
    pub fn experts(&self) -> &[ExpertId] {
        &self.experts[..self.k as usize]
    }

    /// The weights, aligned with [`TokenRoute::experts`].
    pub fn weights(&self) -> &[f32] {
        &self.weights[..self.k as usize]
    }

    /// The expert with the largest weight.
    pub fn primary(&self) -> ExpertId {
        self.experts[0]
    }
}

/// Whether one route serves every layer or each layer has its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteScope {
    /// One route per token for the whole model (the Read-ME router).
    AllLayers,
    /// One route per token and layer.
    PerLayer(usize),
}

impl RouteScope {
    /// Routes stored per token.
    pub fn rows(self) -> usize {
        match self {
            RouteScope::AllLayers => 1,
            RouteScope::PerLayer(n) => n,
        }
    }

    fn row(self, layer: usize) -> usize {
        match self {
            RouteScope::AllLayers => 0,
            RouteScope::PerLayer(_) => layer,
        }
    }
}

/// Routes of a sequence of tokens, in token order.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutePlan {
    num_experts: usize,
    scope: RouteScope,
    routes: Vec<TokenRoute>,
}

impl RoutePlan {
    /// An empty plan over `num_experts` experts per layer.
    pub fn new(num_experts: usize, scope: RouteScope) -> Self {
        RoutePlan {
            num_experts,
            scope,
            routes: Vec::new(),
        }
    }

    /// A plan routing every token of `experts` to that single expert at every layer.
    pub fn from_top1(num_experts: usize, experts: &[ExpertId]) -> Self {
        RoutePlan {
            num_experts,
            scope: RouteScope::AllLayers,
            routes: experts.iter().map(|&e| TokenRoute::single(e)).collect(),
        }
    }

    /// Experts per layer.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }

    /// Shared or per-layer routes.
    pub fn scope(&self) -> RouteScope {
        self.scope
    }

    /// Tokens routed so far.
    pub fn len(&self) -> usize {
        self.routes.len() / self.scope.rows()
    }

    /// Whether no token is routed.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Appends one token; `rows` holds one route, or one per layer for [`RouteScope::PerLayer`].
    pub fn push(&mut self, rows: &[TokenRoute]) -> crate::Result<()> {
        if rows.len() != self.scope.rows() {
            return Err(crate::Error::InvalidArgument(format!(
                "a token needs {} route rows, got {}",
                self.scope.rows(),
                rows.len()
            )));
        }
        if let Some(bad) = rows
            .iter()
            .flat_map(|r| r.experts())
            .find(|&&e| e as usize >= self.num_experts)
        {
            return Err(crate::Error::InvalidArgument(format!(
                "expert {bad} is outside 0..{}",
                self.num_experts
            )));
        }
        self.routes.extend_from_slice(rows);
        Ok(())
    }

    /// Appends every token of `other` (same experts and scope).
    pub fn extend(&mut self, other: &RoutePlan) -> crate::Result<()> {
        if other.num_experts != self.num_experts || other.scope != self.scope {
            return Err(crate::Error::InvalidArgument(
                "route plans of different shapes cannot be joined".into(),
            ));
        }
        self.routes.extend_from_slice(&other.routes);
        Ok(())
    }

    /// The route of `token` at `layer`.
    pub fn route(&self, token: usize, layer: usize) -> &TokenRoute {
        &self.routes[token * self.scope.rows() + self.scope.row(layer)]
    }

    /// The tokens in `range` as a new plan.
    pub fn slice(&self, range: Range<usize>) -> RoutePlan {
        let rows = self.scope.rows();
        RoutePlan {
            num_experts: self.num_experts,
            scope: self.scope,
            routes: self.routes[range.start * rows..range.end * rows].to_vec(),
        }
    }

    /// Drops the routes of the first `n` tokens (they have been computed and will not be read again).
    pub fn drain_front(&mut self, n: usize) {
        let rows = self.scope.rows();
        self.routes.drain(..n.min(self.len()) * rows);
    }

    /// The distinct experts that tokens `range` use at `layer`.
    pub fn experts_used(&self, range: Range<usize>, layer: usize) -> ExpertSet {
        let mut set = ExpertSet::default();
        for t in range {
            for &e in self.route(t, layer).experts() {
                set.insert(e);
            }
        }
        set
    }

    /// The primary (largest-weight) expert of every token at `layer`.
    pub fn primary_experts(&self, layer: usize) -> Vec<ExpertId> {
        (0..self.len())
            .map(|t| self.route(t, layer).primary())
            .collect()
    }
}

/// A set of expert ids of one layer, as a fixed bit set (no allocation on the scheduling path).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct ExpertSet([u64; MAX_EXPERTS / 64]);

impl ExpertSet {
    /// Adds `e`; returns whether it was new.
    pub fn insert(&mut self, e: ExpertId) -> bool {
        let (w, b) = (e as usize / 64, e as usize % 64);
        let new = self.0[w] & (1 << b) == 0;
        self.0[w] |= 1 << b;
        new
    }

    /// Whether `e` is in the set.
    pub fn contains(&self, e: ExpertId) -> bool {
        self.0[e as usize / 64] & (1 << (e as usize % 64)) != 0
    }

    /// Removes `e`.
    pub fn remove(&mut self, e: ExpertId) {
        self.0[e as usize / 64] &= !(1 << (e as usize % 64));
    }

    /// Number of experts in the set.
    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    /// The union of two sets.
    pub fn union(&self, other: &ExpertSet) -> ExpertSet {
        let mut out = *self;
        for (a, b) in out.0.iter_mut().zip(other.0.iter()) {
            *a |= b;
        }
        out
    }

    /// The experts in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = ExpertId> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &bits)| {
            (0..64)
                .filter(move |b| bits & (1u64 << b) != 0)
                .map(move |b| (w * 64 + b) as ExpertId)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_scope_serves_every_layer() {
        let plan = RoutePlan::from_top1(7, &[3, 3, 5]);
        assert_eq!(plan.len(), 3);
        assert_eq!(plan.route(2, 0).experts(), &[5]);
        assert_eq!(plan.route(2, 31).experts(), &[5]);
        assert_eq!(plan.route(0, 4).weights(), &[1.0]);
        let used = plan.experts_used(0..3, 9);
        assert_eq!(used.iter().collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(used.len(), 2);
    }

    #[test]
    fn per_layer_routes_differ_by_layer() {
        let mut plan = RoutePlan::new(4, RouteScope::PerLayer(2));
        plan.push(&[TokenRoute::single(1), TokenRoute::single(2)])
            .unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!(plan.route(0, 0).primary(), 1);
        assert_eq!(plan.route(0, 1).primary(), 2);
        assert!(plan.push(&[TokenRoute::single(1)]).is_err());
        assert!(plan
            .push(&[TokenRoute::single(1), TokenRoute::single(4)])
            .is_err());
    }

    #[test]
    fn slicing_and_draining_keep_order() {
        let mut plan = RoutePlan::from_top1(8, &[0, 1, 2, 3, 4]);
        assert_eq!(plan.slice(1..3).primary_experts(0), vec![1, 2]);
        plan.drain_front(2);
        assert_eq!(plan.primary_experts(0), vec![2, 3, 4]);
    }

    #[test]
    fn bad_routes_are_rejected() {
        assert!(TokenRoute::new(&[1, 1], &[0.5, 0.5]).is_err());
        assert!(TokenRoute::new(&[], &[]).is_err());
        assert!(TokenRoute::new(&[1], &[0.5, 0.5]).is_err());
        let r = TokenRoute::new(&[4, 2], &[0.7, 0.3]).unwrap();
        assert_eq!(r.experts(), &[4, 2]);
        assert_eq!(r.primary(), 4);
    }

    #[test]
    fn expert_set_operations() {
        let mut a = ExpertSet::default();
        assert!(a.insert(200));
        assert!(!a.insert(200));
        a.insert(3);
        let mut b = ExpertSet::default();
        b.insert(64);
        let u = a.union(&b);
        assert_eq!(u.iter().collect::<Vec<_>>(), vec![3, 64, 200]);
        a.remove(3);
        assert!(!a.contains(3) && a.contains(200));
    }
}
