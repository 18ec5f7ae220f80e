use super::*;
use crate::route::{ExpertId, RoutePlan};
use proptest::prelude::*;

/// A request as a toy engine sees it: every token's route fixed in advance, revealed in order.
#[derive(Debug, Clone)]
struct Toy {
    id: SeqId,
    arrival: f64,
    routes: RoutePlan,
    prompt: usize,
    output: usize,
    computed: usize,
    generated: usize,
    done: bool,
}

impl Toy {
    fn new(id: SeqId, arrival: f64, experts: &[ExpertId], prompt: usize) -> Self {
        Toy {
            id,
            arrival,
            routes: RoutePlan::from_top1(4, experts),
            prompt,
            output: experts.len() + 1 - prompt,
            computed: 0,
            generated: 0,
            done: false,
        }
    }
    fn known(&self) -> usize {
        self.prompt + self.generated
    }
    fn view(&self) -> PendingView<'_> {
        PendingView {
            seq: self.id,
            tokens: self.known() - self.computed,
            routes: &self.routes,
            route_offset: self.computed,
            prefill: self.computed < self.prompt,
            generated: self.generated,
        }
    }
    fn desc(&self) -> RequestDesc {
        RequestDesc {
            id: self.id,
            arrival: self.arrival,
            prompt_len: self.prompt,
            output_len: Some(self.output),
            deadline: None,
            kv_bytes: (self.prompt + self.output) as u64,
        }
    }
    /// Computes `n` tokens; samples when caught up. Returns whether it finished.
    fn run(&mut self, n: usize) -> bool {
        self.computed += n;
        if self.computed == self.known() {
            self.generated += 1;
            if self.generated == self.output {
                self.done = true;
            }
        }
        self.done
    }
}

fn decode_only(experts: &[ExpertId]) -> Vec<Toy> {
    experts
        .iter()
        .enumerate()
        .map(|(i, &e)| {
            let mut t = Toy::new(i as SeqId + 1, i as f64 * 1e-3, &[e, e, e], 1);
            t.computed = 1;
            t.generated = 1;
            t
        })
        .collect()
}

fn batcher(policy: BatchPolicy, budget: usize) -> LookaheadBatcher {
    LookaheadBatcher::new(BatcherConfig {
        policy,
        max_batch_tokens: budget,
        max_prefill_chunk: budget,
        ..BatcherConfig::default()
    })
    .unwrap()
}

fn plan_for(b: &mut LookaheadBatcher, toys: &[Toy], resident: &ExpertSet) -> StepPlan {
    for t in toys {
        let _ = b.submit(t.desc());
    }
    b.schedule(1.0, toys.iter().map(Toy::view), resident)
        .unwrap()
        .clone()
}

#[test]
fn expert_aware_takes_the_longest_queue_first() {
    let toys = decode_only(&[3, 0, 1, 0, 2, 0, 1, 0, 2, 3]);
    let mut b = batcher(BatchPolicy::ExpertAware, 4);
    let p = plan_for(&mut b, &toys, &ExpertSet::default());
    assert_eq!(p.tokens, 4);
    assert_eq!(p.experts.iter().collect::<Vec<_>>(), vec![0]);
    let mut d = batcher(BatchPolicy::DecodeFirst, 4);
    let q = plan_for(&mut d, &toys, &ExpertSet::default());
    assert_eq!(q.tokens, 4);
    assert_eq!(q.experts.len(), 3, "oldest four use experts 3, 0, 1");
}

#[test]
fn without_routes_known_ahead_expert_aware_degrades_to_decode_first() {
    // An in-model router: no token's route is known before its step runs.
    let mut toys = decode_only(&[3, 0, 1, 0, 2, 0, 1, 0, 2, 3]);
    for t in &mut toys {
        t.routes = RoutePlan::new(4, crate::route::RouteScope::AllLayers);
        t.computed = 0;
    }
    let mut e = batcher(BatchPolicy::ExpertAware, 4);
    let p = plan_for(&mut e, &toys, &ExpertSet::default());
    let mut d = batcher(BatchPolicy::DecodeFirst, 4);
    let q = plan_for(&mut d, &toys, &ExpertSet::default());
    assert_eq!(p.entries(), q.entries());
    assert_eq!(p.tokens, 4);
    assert!(
        p.experts.is_empty(),
        "no route is known, so no expert is claimed"
    );
}

#[test]
fn expert_aware_splits_the_last_queue_to_fill_the_budget() {
    let toys = decode_only(&[0, 0, 0, 1, 1, 2]);
    let mut b = batcher(BatchPolicy::ExpertAware, 4);
    let p = plan_for(&mut b, &toys, &ExpertSet::default());
    assert_eq!(p.tokens, 4);
    assert_eq!(p.experts.iter().collect::<Vec<_>>(), vec![0, 1]);
}

#[test]
fn expert_aware_advances_a_prompt_by_its_expert_runs() {
    // A prompt 0 0 1 1 2 and two decode tokens on expert 1: with room for 4 tokens, A = {0, 1}.
    let mut toys = decode_only(&[1, 1]);
    toys.push(Toy::new(9, 0.5, &[0, 0, 1, 1, 2, 2], 5));
    let mut b = batcher(BatchPolicy::ExpertAware, 4);
    let p = plan_for(&mut b, &toys, &ExpertSet::default());
    assert_eq!(p.tokens, 4);
    assert!(p.experts.len() <= 2, "{:?}", p.experts);
}

#[test]
fn policies_order_prefill_and_decode() {
    let mut toys = decode_only(&[0, 1]);
    toys.push(Toy::new(9, 0.5, &[2, 2, 2, 2], 3));
    let mut pf = batcher(BatchPolicy::PrefillFirst, 3);
    let p = plan_for(&mut pf, &toys, &ExpertSet::default());
    assert_eq!(p.entries(), vec![(9, 3)]);
    let mut df = batcher(BatchPolicy::DecodeFirst, 3);
    let p = plan_for(&mut df, &toys, &ExpertSet::default());
    assert_eq!(p.entries(), vec![(1, 1), (2, 1), (9, 1)]);
}

#[test]
fn load_budget_keeps_to_resident_experts_but_never_stalls() {
    let toys = decode_only(&[0, 1, 2, 1]);
    let mut resident = ExpertSet::default();
    resident.insert(1);
    for policy in BatchPolicy::ALL {
        let mut b = LookaheadBatcher::new(BatcherConfig {
            policy,
            max_expert_loads: Some(0),
            ..BatcherConfig::default()
        })
        .unwrap();
        let p = plan_for(&mut b, &toys, &resident);
        assert_eq!(p.experts.iter().collect::<Vec<_>>(), vec![1], "{policy}");
        assert_eq!(p.loads, 0);
        let mut b = LookaheadBatcher::new(BatcherConfig {
            policy,
            max_expert_loads: Some(0),
            ..BatcherConfig::default()
        })
        .unwrap();
        let p = plan_for(&mut b, &toys[..1], &resident);
        assert_eq!(p.chunks[0].reason, Reason::Progress, "{policy}");
    }
}

#[test]
fn kv_admission_is_in_arrival_order() {
    let toys = vec![
        Toy::new(1, 0.0, &[0; 8], 4),
        Toy::new(2, 0.1, &[0; 20], 10),
        Toy::new(3, 0.2, &[0; 4], 2),
    ];
    let mut b = LookaheadBatcher::new(BatcherConfig {
        kv_capacity_bytes: Some(25),
        ..BatcherConfig::default()
    })
    .unwrap();
    let p = plan_for(&mut b, &toys, &ExpertSet::default());
    // 1 (9 bytes) fits; 2 (21) does not and blocks 3 although 3 would fit.
    assert_eq!(p.admitted, vec![1]);
    assert_eq!((b.running(), b.waiting(), b.kv_used()), (1, 2, 9));
    assert!(!b.is_waiting(1) && b.is_waiting(2) && b.is_waiting(3));
    assert!(!b.is_waiting(99), "unknown requests are not waiting");
    b.finish(1);
    assert_eq!((b.running(), b.kv_used()), (0, 0));
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    assert!("greedy"
        .parse::<BatchPolicy>()
        .unwrap_err()
        .to_string()
        .contains("greedy"));
    assert!(LookaheadBatcher::new(BatcherConfig {
        max_batch_tokens: 0,
        ..BatcherConfig::default()
    })
    .is_err());
    assert!(LookaheadBatcher::new(BatcherConfig {
        max_wait: Some(-1.0),
        ..BatcherConfig::default()
    })
    .is_err());
    let mut b = batcher(BatchPolicy::Fcfs, 8);
    let t = Toy::new(1, 0.0, &[0, 0], 1);
    b.submit(t.desc()).unwrap();
    assert!(b.submit(t.desc()).is_err(), "duplicate id");
    let mut d = t.desc();
    d.id = 2;
    d.prompt_len = 0;
    assert!(b.submit(d).is_err());
    let stranger = Toy::new(7, 0.0, &[0, 0], 1);
    assert!(b
        .schedule(0.0, [stranger.view()], &ExpertSet::default())
        .is_err());
}

#[test]
fn deadline_makes_a_request_due() {
    let mut toys = decode_only(&[0, 0, 0]);
    toys.push(Toy::new(9, 0.9, &[3, 3, 3], 2));
    let mut b = batcher(BatchPolicy::DecodeFirst, 2);
    for t in &toys {
        let mut d = t.desc();
        if t.id == 9 {
            d.deadline = Some(1.0);
        }
        b.submit(d).unwrap();
    }
    let p = b
        .schedule(1.0, toys.iter().map(Toy::view), &ExpertSet::default())
        .unwrap();
    assert_eq!(p.chunks[0].seq, 9);
    assert_eq!(p.chunks[0].reason, Reason::Deadline);
}

/// Runs toys to completion with constant steps of `dt`; checks every guard at every step.
fn drive(
    cfg: BatcherConfig,
    mut toys: Vec<Toy>,
    dt: f64,
) -> std::result::Result<(), TestCaseError> {
    let max_wait = cfg.max_wait.unwrap_or(f64::INFINITY);
    let mut b = LookaheadBatcher::new(cfg.clone()).unwrap();
    toys.sort_by(|a, b| a.arrival.partial_cmp(&b.arrival).unwrap());
    let mut submitted = 0;
    let mut now = 0.0;
    let mut admitted: Vec<SeqId> = Vec::new();
    let total: usize = toys.iter().map(|t| t.prompt + t.output - 1).sum();
    let mut computed_total = 0;
    for _ in 0..100_000 {
        while submitted < toys.len() && toys[submitted].arrival <= now {
            b.submit(toys[submitted].desc()).unwrap();
            submitted += 1;
        }
        let live: Vec<&Toy> = toys[..submitted].iter().filter(|t| !t.done).collect();
        if live.is_empty() {
            if submitted == toys.len() {
                prop_assert_eq!(computed_total, total);
                return Ok(());
            }
            now = toys[submitted].arrival;
            continue;
        }
        let views = live
            .iter()
            .filter(|t| admitted.contains(&t.id))
            .chain(live.iter().filter(|t| !admitted.contains(&t.id)))
            .map(|t| t.view());
        let plan = b
            .schedule(now, views, &ExpertSet::default())
            .unwrap()
            .clone();
        prop_assert!(plan.tokens <= cfg.max_batch_tokens);
        prop_assert!(!plan.is_empty(), "work pending but nothing scheduled");
        prop_assert!(b.running() <= cfg.max_running);
        if let Some(cap) = cfg.kv_capacity_bytes {
            prop_assert!(b.kv_used() <= cap);
        }
        for (k, c) in plan.chunks.iter().enumerate() {
            prop_assert!(plan.chunks[..k].iter().all(|o| o.seq != c.seq), "twice");
            let t = toys.iter().find(|t| t.id == c.seq).unwrap();
            let pending = t.known() - t.computed;
            prop_assert!(c.tokens >= 1 && c.tokens <= pending);
            if c.prefill {
                prop_assert!(c.tokens <= cfg.max_prefill_chunk);
                prop_assert!(
                    t.computed + c.tokens <= t.prompt,
                    "prefill chunk crosses into decode"
                );
            }
            if admitted.contains(&c.seq) {
                prop_assert!(
                    c.waited < max_wait + 1e-9,
                    "waited {} > {}",
                    c.waited,
                    max_wait
                );
            }
        }
        admitted.extend(plan.admitted.iter().copied());
        for c in &plan.chunks {
            let t = toys.iter_mut().find(|t| t.id == c.seq).unwrap();
            computed_total += c.tokens;
            if t.run(c.tokens) {
                b.finish(t.id);
            }
        }
        b.step_done(now, now + dt);
        now += dt;
    }
    Err(TestCaseError::fail("did not finish"))
}

fn toys_strategy() -> impl Strategy<Value = Vec<Toy>> {
    proptest::collection::vec(
        (
            0.0f64..0.2,
            proptest::collection::vec(0u16..4, 2..30),
            1usize..20,
        ),
        1..10,
    )
    .prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (arrival, experts, p))| {
                let prompt = p.min(experts.len() - 1);
                Toy::new(i as SeqId + 1, arrival, &experts, prompt)
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn every_policy_respects_budgets_waits_and_order(
        toys in toys_strategy(),
        policy in 0usize..4,
        running in 1usize..8,
        extra in 0usize..24,
        chunk in 1usize..16,
        kv in proptest::option::of(31u64..120),
    ) {
        let cfg = BatcherConfig {
            policy: BatchPolicy::ALL[policy],
            max_batch_tokens: running + extra,
            max_prefill_chunk: chunk,
            max_running: running,
            max_wait: Some(0.035),
            kv_capacity_bytes: kv,
            max_expert_loads: None,
        };
        drive(cfg, toys, 0.01)?;
    }
}
