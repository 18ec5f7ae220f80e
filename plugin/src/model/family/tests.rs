use std::collections::BTreeMap;

use super::*;
use crate::model::presets::Preset;
use crate::model::{inspect, make_model, ModelDir};

fn tiny() -> crate::model::ModelSpec {
    Preset::Tiny.spec()
}

#[test]
fn families_are_detected_and_unknown_ones_list_the_supported() {
    let arch = |a: &str| vec![a.to_string()];
    for (archs, mt) in [
        (arch("ReadMEForCausalLM"), None),
        (arch("LlamaForCausalLM"), Some("llama")),
        (vec![], Some("llama")),
        (vec![], None),
    ] {
        assert_eq!(ModelFamily::detect(&archs, mt), Ok(ModelFamily::ReadMe));
    }
    for f in [
        ModelFamily::Mixtral,
        ModelFamily::Qwen2Moe,
        ModelFamily::Qwen3Moe,
        ModelFamily::Olmoe,
    ] {
        assert_eq!(
            ModelFamily::detect(&arch(f.architectures()[0]), None),
            Ok(f)
        );
        assert_eq!(ModelFamily::detect(&[], Some(f.model_types()[0])), Ok(f));
        assert!(f.routes_in_model());
    }
    let err = ModelFamily::detect(&arch("GptOssForCausalLM"), Some("gpt_oss")).unwrap_err();
    for needle in [
        "GptOssForCausalLM",
        "ReadMEForCausalLM",
        "LlamaForCausalLM",
        "MixtralForCausalLM",
        "OlmoeForCausalLM",
    ] {
        assert!(err.contains(needle), "{err}");
    }
    let err = ModelFamily::detect(&[], Some("deepseek_v3")).unwrap_err();
    assert!(
        err.contains("deepseek_v3") && err.contains("`llama`") && err.contains("`qwen3_moe`"),
        "{err}"
    );
}

#[test]
fn family_plans_and_inventories_use_the_hub_names() {
    let plan = |p: Preset| p.spec().plan(ExpertLayout::Fused).unwrap();
    let q2 = plan(Preset::Qwen2MoeTiny);
    assert!(q2.pre_gate.is_none());
    assert_eq!(q2.layers[1].ffn, FfnPlan::Dense { inter: 128 });
    let moe = q2.moe(0).unwrap();
    assert_eq!(
        moe.shared,
        Some(SharedExpertPlan {
            inter: 80,
            gated: true
        })
    );
    assert_eq!(moe.gating, GatingRule::SoftmaxTopK { renormalize: false });
    assert!(q2.layers[0].attention.qkv_bias);
    let inv = q2.inventory();
    let shape = |inv: &Inventory, name: &str| {
        inv.tensors()
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.shape.clone())
    };
    assert_eq!(
        shape(&inv, "model.layers.0.mlp.gate.weight"),
        Some(vec![4, 64])
    );
    assert_eq!(
        shape(&inv, "model.layers.0.mlp.shared_expert_gate.weight"),
        Some(vec![1, 64])
    );
    assert_eq!(
        shape(&inv, "model.layers.2.mlp.experts.3.down_proj.weight"),
        Some(vec![64, 48])
    );
    assert_eq!(
        shape(&inv, "model.layers.1.mlp.up_proj.weight"),
        Some(vec![128, 64])
    );
    assert_eq!(
        shape(&inv, "model.layers.1.self_attn.k_proj.bias"),
        Some(vec![32])
    );
    assert!(shape(&inv, "model.layers.1.mlp.gate.weight").is_none());
    let q3 = plan(Preset::Qwen3MoeTiny).inventory();
    assert_eq!(
        shape(&q3, "model.layers.0.self_attn.q_norm.weight"),
        Some(vec![32])
    );
    assert_eq!(
        shape(&q3, "model.layers.0.self_attn.q_proj.weight"),
        Some(vec![128, 64])
    );
    let olmoe = plan(Preset::OlmoeTiny).inventory();
    assert_eq!(
        shape(&olmoe, "model.layers.1.self_attn.q_norm.weight"),
        Some(vec![64])
    );
    assert_eq!(
        shape(&olmoe, "model.layers.1.self_attn.k_norm.weight"),
        Some(vec![64])
    );
    let mixtral = plan(Preset::MixtralTiny).inventory();
    assert_eq!(
        shape(
            &mixtral,
            "model.layers.1.block_sparse_moe.experts.3.w2.weight"
        ),
        Some(vec![64, 96])
    );
    assert_eq!(
        shape(&mixtral, "model.layers.0.block_sparse_moe.gate.weight"),
        Some(vec![4, 64])
    );
    let mut stacked = plan(Preset::MixtralTiny);
    stacked.expert_storage = ExpertStorage::Stacked;
    let inv = stacked.inventory();
    assert_eq!(
        shape(&inv, "model.layers.0.mlp.experts.gate_up_proj"),
        Some(vec![4, 192, 64])
    );
    assert_eq!(
        shape(&inv, "model.layers.0.mlp.experts.down_proj"),
        Some(vec![4, 64, 96])
    );
    assert!(inv
        .get(TensorRole::Expert {
            layer: 0,
            expert: 0,
            proj: FfnProj::Gate
        })
        .is_none());
}

#[test]
fn readme_plans_follow_the_layout() {
    let spec = tiny();
    for layout in [
        ExpertLayout::Fused,
        ExpertLayout::Residual,
        ExpertLayout::Masked,
    ] {
        let plan = spec.plan(layout).unwrap();
        assert_eq!(plan.family, ModelFamily::ReadMe);
        assert_eq!(plan.layers.len(), 2);
        assert_eq!(plan.pre_gate.as_ref().map(|r| r.embedding_dim), Some(32));
        for l in 0..2 {
            let layer = plan.layer(l).unwrap();
            assert_eq!(
                layer.attention,
                AttentionPlan {
                    heads: 4,
                    kv_heads: 2,
                    head_dim: 16,
                    qkv_bias: false,
                    qk_norm: QkNorm::None,
                    rope_theta: 10_000.0,
                    sliding_window: None,
                }
            );
            let (inter, shared) = match layout {
                ExpertLayout::Fused => (64, None),
                ExpertLayout::Residual => (
                    48,
                    Some(SharedExpertPlan {
                        inter: 16,
                        gated: false,
                    }),
                ),
                ExpertLayout::Masked => (128, None),
            };
            assert_eq!(
                layer.ffn,
                FfnPlan::Moe(MoePlan {
                    experts: 4,
                    top_k: 1,
                    expert_inter: inter,
                    shared,
                    gating: GatingRule::PreGate,
                }),
                "{layout:?}"
            );
        }
    }
}

/// The tiny preset's inventory, written out by hand: name -> shape.
fn hand_inventory(layout: ExpertLayout) -> BTreeMap<String, Vec<usize>> {
    let mut m = BTreeMap::new();
    let mut put = |n: &str, s: &[usize]| {
        assert!(m.insert(n.to_string(), s.to_vec()).is_none(), "{n}");
    };
    put("model.embed_tokens.weight", &[512, 64]);
    put("model.norm.weight", &[64]);
    put("lm_head.weight", &[512, 64]);
    for l in 0..2 {
        let p = format!("model.layers.{l}.");
        put(&format!("{p}input_layernorm.weight"), &[64]);
        put(&format!("{p}post_attention_layernorm.weight"), &[64]);
        put(&format!("{p}self_attn.q_proj.weight"), &[64, 64]);
        put(&format!("{p}self_attn.k_proj.weight"), &[32, 64]);
        put(&format!("{p}self_attn.v_proj.weight"), &[32, 64]);
        put(&format!("{p}self_attn.o_proj.weight"), &[64, 64]);
        let mut ffn = |stem: &str, suffix: &str, i: usize| {
            put(&format!("{p}{stem}gate_proj{suffix}.weight"), &[i, 64]);
            put(&format!("{p}{stem}up_proj{suffix}.weight"), &[i, 64]);
            put(&format!("{p}{stem}down_proj{suffix}.weight"), &[64, i]);
        };
        match layout {
            ExpertLayout::Fused => (0..4).for_each(|e| ffn("moe.", &format!("_{e}"), 64)),
            ExpertLayout::Residual => {
                (0..4).for_each(|e| ffn("moe.", &format!("_{e}"), 48));
                ffn("moe.", "_residual", 16);
            }
            ExpertLayout::Masked => {
                ffn("mlp.", "", 128);
                put(&format!("{p}mlp.expert_mask"), &[4, 128]);
                put(&format!("{p}mlp.residual_mask"), &[128]);
            }
        }
    }
    let r = |n: &str| format!("cluster_predictor.{n}");
    put(&r("embed.weight"), &[512, 32]);
    put(&r("input_layernorm_0.weight"), &[32]);
    for p in ["q", "k", "v", "o"] {
        put(&r(&format!("{p}_proj_0.weight")), &[32, 32]);
        put(&r(&format!("{p}_proj_0.bias")), &[32]);
    }
    put(&r("post_attention_layernorm_0.weight"), &[32]);
    put(&r("proj_1_0.weight"), &[48, 32]);
    put(&r("proj_1_0.bias"), &[48]);
    put(&r("proj_2_0.weight"), &[32, 48]);
    put(&r("proj_2_0.bias"), &[32]);
    put(&r("out_layernorm.weight"), &[32]);
    put(&r("proj_out.weight"), &[4, 32]);
    put(&r("proj_out.bias"), &[4]);
    m
}

#[test]
fn inventories_match_the_hand_written_tiny_model() {
    for (layout, count) in [
        (ExpertLayout::Fused, 57),
        (ExpertLayout::Residual, 63),
        (ExpertLayout::Masked, 43),
    ] {
        let inv = tiny().plan(layout).unwrap().inventory();
        let got: BTreeMap<String, Vec<usize>> = inv
            .tensors()
            .iter()
            .map(|t| (t.name.clone(), t.shape.clone()))
            .collect();
        assert_eq!(inv.tensors().len(), count, "{layout:?}: duplicates?");
        assert_eq!(got, hand_inventory(layout), "{layout:?}");
        // Every role is found again by itself.
        for t in inv.tensors() {
            assert_eq!(inv.get(t.role), Some(t), "{}", t.name);
        }
    }
    let fused = tiny().plan(ExpertLayout::Fused).unwrap().inventory();
    let [g, u, d] = fused.expert(1, 3).unwrap();
    assert_eq!(g.name, "model.layers.1.moe.gate_proj_3.weight");
    assert_eq!(u.name, "model.layers.1.moe.up_proj_3.weight");
    assert_eq!(
        (d.name.as_str(), &d.shape[..]),
        ("model.layers.1.moe.down_proj_3.weight", &[64, 64][..])
    );
    assert!(fused.expert(1, 4).is_err());
    assert!(fused.shared_expert(0).is_none());
    let residual = tiny().plan(ExpertLayout::Residual).unwrap().inventory();
    assert_eq!(residual.shared_expert(1).unwrap()[2].shape, vec![64, 16]);
    assert_eq!(
        fused
            .get(TensorRole::PreGate {
                part: PreGatePart::ProjOut,
                bias: true
            })
            .map(|t| &t.shape[..]),
        Some(&[4][..])
    );
}

#[test]
fn tied_embeddings_drop_lm_head() {
    let mut spec = tiny();
    spec.config.tie_word_embeddings = true;
    let inv = spec.plan(ExpertLayout::Fused).unwrap().inventory();
    assert!(inv.get(TensorRole::LmHead).is_none());
    assert_eq!(inv.tensors().len(), 56);
}

#[test]
fn a_plan_needs_the_router_config() {
    let mut cfg = tiny().config;
    cfg.readme_router = None;
    let err = ModelPlan::new(
        &cfg,
        ExpertLayout::Fused,
        &[FfnWidths {
            expert: 8,
            shared: 0,
        }; 2],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("Read-ME needs its cluster_predictor: missing `embedding_dim`"),
        "{err}"
    );
}

fn names_and_shapes(ck: &crate::model::Checkpoint) -> BTreeMap<String, Vec<usize>> {
    ck.names()
        .iter()
        .map(|n| (n.to_string(), ck.tensor(n).unwrap().shape.to_vec()))
        .collect()
}

#[test]
fn writer_loader_and_inspect_agree_with_the_inventory() {
    for layout in [
        ExpertLayout::Fused,
        ExpertLayout::Residual,
        ExpertLayout::Masked,
    ] {
        let spec = tiny();
        let dir = tempfile::tempdir().unwrap();
        make_model(&spec, layout, 3, dir.path()).unwrap();
        let inv = spec.plan(layout).unwrap().inventory();
        let want = |masks: bool| -> BTreeMap<String, Vec<usize>> {
            inv.tensors()
                .iter()
                .filter(|t| t.role.in_masks_file() == masks)
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect()
        };

        // The writer: exactly the inventory, weights and masks in their files.
        let model = ModelDir::open(dir.path()).unwrap();
        assert_eq!(
            names_and_shapes(&model.checkpoint),
            want(false),
            "{layout:?}"
        );
        let masks_path = dir.path().join(crate::model::random::MASKS_FILE);
        if layout == ExpertLayout::Masked {
            let masks = crate::model::Checkpoint::open_file(&masks_path).unwrap();
            assert_eq!(names_and_shapes(&masks), want(true));
        } else {
            assert!(!masks_path.exists());
        }

        // The loader: the plan it reads back from the shapes is the one written.
        assert_eq!(model.plan, spec.plan(layout).unwrap(), "{layout:?}");
        if layout != ExpertLayout::Masked {
            let w = model.load_weights().unwrap();
            let l1 = &w.layers[1];
            let e3 = inv.expert(1, 3).unwrap();
            assert_eq!(
                [l1.experts[3].gate.rows, l1.experts[3].gate.cols],
                e3[0].shape[..]
            );
            assert_eq!(l1.experts.len(), 4);
            assert_eq!(l1.shared.is_some(), layout == ExpertLayout::Residual);
            let loaded = w.embed.data.len()
                + w.norm.len()
                + w.lm_head.as_ref().map_or(0, |m| m.data.len())
                + w.layers
                    .iter()
                    .map(|l| {
                        l.input_norm.len()
                            + l.post_norm.len()
                            + l.q.data.len()
                            + l.k.data.len()
                            + l.v.data.len()
                            + l.o.data.len()
                            + l.experts
                                .iter()
                                .chain(&l.shared)
                                .map(|e| e.bytes() / 4)
                                .sum::<usize>()
                    })
                    .sum::<usize>();
            let router = inv
                .weights()
                .filter(|t| matches!(t.role, TensorRole::PreGate { .. }))
                .map(|t| t.numel())
                .sum::<usize>();
            assert_eq!(loaded + router, inv.weight_params(), "{layout:?}");
            assert_eq!(w.router.proj_out.weight.rows, 4);
        }

        // inspect: its counts are the inventory's.
        let report = inspect::inspect(dir.path()).unwrap();
        assert_eq!(report.params.total, inv.weight_params(), "{layout:?}");
        let by = |keep: fn(&TensorRole) -> bool| -> usize {
            inv.weights()
                .filter(|t| keep(&t.role))
                .map(|t| t.numel())
                .sum()
        };
        assert_eq!(
            report.params.router,
            by(|r| matches!(r, TensorRole::PreGate { .. }))
        );
        assert_eq!(
            report.params.experts,
            by(|r| matches!(
                r,
                TensorRole::Expert { .. }
                    | TensorRole::SharedExpert { .. }
                    | TensorRole::DenseMlp { .. }
            ))
        );
    }
}

#[test]
fn expert_widths_may_differ_per_layer() {
    let cfg = tiny().config;
    let widths = [
        FfnWidths {
            expert: 40,
            shared: 8,
        },
        FfnWidths {
            expert: 24,
            shared: 16,
        },
    ];
    let plan = ModelPlan::new(&cfg, ExpertLayout::Residual, &widths).unwrap();
    let inv = plan.inventory();
    for (l, w) in widths.iter().enumerate() {
        assert_eq!(plan.moe(l).unwrap().expert_inter, w.expert);
        assert_eq!(inv.expert(l, 2).unwrap()[0].shape, vec![w.expert, 64]);
        assert_eq!(inv.shared_expert(l).unwrap()[2].shape, vec![64, w.shared]);
    }
    // A residual layer needs its shared part; the widths must cover every layer.
    let err = ModelPlan::new(
        &cfg,
        ExpertLayout::Residual,
        &[
            widths[0],
            FfnWidths {
                expert: 8,
                shared: 0,
            },
        ],
    );
    assert!(err.is_err());
    assert!(ModelPlan::new(&cfg, ExpertLayout::Fused, &widths[..1]).is_err());
}
