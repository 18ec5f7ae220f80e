//! Tensor names of the Hugging Face MoE families as their checkpoints on the Hub spell them
//! (transformers' `save_pretrained` writes the same names): the attention and norms are Llama's
//! ([`crate::model::names`]); the MoE block, the experts and the attention extras are here.

use super::ModelFamily;
use crate::model::names::layer;

/// The MoE block's module: Mixtral's `block_sparse_moe`, the others' `mlp`.
fn moe_block(family: ModelFamily) -> &'static str {
    match family {
        ModelFamily::Mixtral => "block_sparse_moe",
        _ => "mlp",
    }
}

/// Layer `l`'s router `[experts, hidden]`.
pub fn gate_name(family: ModelFamily, l: usize) -> String {
    layer(l, &format!("{}.gate.weight", moe_block(family)))
}

/// `[gate, up, down]` of routed expert `e` of layer `l`: Mixtral's `w1`, `w3`, `w2`; the others'
/// `gate_proj`, `up_proj`, `down_proj`.
pub fn expert_names(family: ModelFamily, l: usize, e: usize) -> [String; 3] {
    let block = moe_block(family);
    let projs = match family {
        ModelFamily::Mixtral => ["w1", "w3", "w2"],
        _ => ["gate_proj", "up_proj", "down_proj"],
    };
    projs.map(|p| layer(l, &format!("{block}.experts.{e}.{p}.weight")))
}

/// `[gate_up_proj [E, 2I, H], down_proj [E, H, I]]` of layer `l` in transformers v5's stacked form
/// (the `mlp` module in every family, Mixtral's included).
pub fn stacked_expert_names(l: usize) -> [String; 2] {
    [
        layer(l, "mlp.experts.gate_up_proj"),
        layer(l, "mlp.experts.down_proj"),
    ]
}

/// `[gate, up, down]` of Qwen2-MoE's shared expert in layer `l`.
pub fn shared_expert_names(l: usize) -> [String; 3] {
    ["gate_proj", "up_proj", "down_proj"]
        .map(|p| layer(l, &format!("mlp.shared_expert.{p}.weight")))
}

/// Qwen2-MoE's shared expert gate `[1, hidden]` of layer `l`.
pub fn shared_expert_gate_name(l: usize) -> String {
    layer(l, "mlp.shared_expert_gate.weight")
}

/// `[q, k, v]` biases of layer `l` (Qwen2-MoE).
pub fn qkv_bias_names(l: usize) -> [String; 3] {
    ["q_proj", "k_proj", "v_proj"].map(|p| layer(l, &format!("self_attn.{p}.bias")))
}

/// `[q_norm, k_norm]` weights of layer `l` (Qwen3-MoE per head, OLMoE over the full width).
pub fn qk_norm_names(l: usize) -> [String; 2] {
    [
        layer(l, "self_attn.q_norm.weight"),
        layer(l, "self_attn.k_norm.weight"),
    ]
}

/// The expert index of a `...experts.{e}.{proj}.weight` name.
pub fn expert_index(name: &str) -> Option<usize> {
    let rest = name.split(".experts.").nth(1)?;
    rest.split('.').next()?.parse().ok()
}

/// Layer `l`'s DSelect-k gate tensor `part` (pregate's own names, the same in every family):
/// `model.layers.{l}.mlp.dselect.{z, alpha}` for a static gate,
/// `model.layers.{l}.mlp.dselect.{z_proj, alpha_proj}.{weight, bias}` for a per-example one.
pub fn dselect_name(l: usize, part: super::DSelectPart) -> String {
    use super::DSelectPart as P;
    let rest = match part {
        P::Z => "z",
        P::Alpha => "alpha",
        P::ZWeight => "z_proj.weight",
        P::ZBias => "z_proj.bias",
        P::AlphaWeight => "alpha_proj.weight",
        P::AlphaBias => "alpha_proj.bias",
    };
    layer(l, &format!("mlp.dselect.{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_hub_ones() {
        assert_eq!(
            expert_names(ModelFamily::Mixtral, 3, 5),
            [
                "model.layers.3.block_sparse_moe.experts.5.w1.weight",
                "model.layers.3.block_sparse_moe.experts.5.w3.weight",
                "model.layers.3.block_sparse_moe.experts.5.w2.weight",
            ]
        );
        assert_eq!(
            gate_name(ModelFamily::Olmoe, 1),
            "model.layers.1.mlp.gate.weight"
        );
        assert_eq!(
            expert_names(ModelFamily::Qwen3Moe, 0, 7)[2],
            "model.layers.0.mlp.experts.7.down_proj.weight"
        );
        assert_eq!(
            expert_index(&expert_names(ModelFamily::Mixtral, 2, 11)[1]),
            Some(11)
        );
        assert_eq!(expert_index(&stacked_expert_names(2)[0]), None);
        assert_eq!(expert_index(&shared_expert_names(0)[0]), None);
    }
}
