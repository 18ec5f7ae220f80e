//! Tensor names of a Read-ME checkpoint (see `plugin/docs/model-format.md`): how each name is
//! spelled. Which tensors a model has, and their shapes, is the inventory of
//! [`family`](super::family), which spells them with these functions; `convert` and the name
//! parsers (`layer_index`, `expert_index`) use them directly.

/// The backbone's token embedding `[V, H]`.
pub const EMBED: &str = "model.embed_tokens.weight";
/// The final RMSNorm `[H]`.
pub const FINAL_NORM: &str = "model.norm.weight";
/// The output projection `[V, H]` (absent when tied).
pub const LM_HEAD: &str = "lm_head.weight";
/// Prefix of every router tensor.
pub const ROUTER_PREFIX: &str = "cluster_predictor.";

/// `model.layers.{layer}.{rest}`.
pub fn layer(layer: usize, rest: &str) -> String {
    format!("model.layers.{layer}.{rest}")
}

/// The attention and norm tensors of a layer, in the order
/// `input_layernorm, q, k, v, o, post_attention_layernorm`.
pub fn attention_tensor_names(l: usize) -> [String; 6] {
    [
        layer(l, "input_layernorm.weight"),
        layer(l, "self_attn.q_proj.weight"),
        layer(l, "self_attn.k_proj.weight"),
        layer(l, "self_attn.v_proj.weight"),
        layer(l, "self_attn.o_proj.weight"),
        layer(l, "post_attention_layernorm.weight"),
    ]
}

/// `[gate, up, down]` of routed expert `expert` in layer `l` (fused and residual layouts).
pub fn expert_tensor_names(l: usize, expert: usize) -> [String; 3] {
    [
        layer(l, &format!("moe.gate_proj_{expert}.weight")),
        layer(l, &format!("moe.up_proj_{expert}.weight")),
        layer(l, &format!("moe.down_proj_{expert}.weight")),
    ]
}

/// `[gate, up, down]` of layer `l`'s always-active shared part (residual layout).
pub fn shared_tensor_names(l: usize) -> [String; 3] {
    [
        layer(l, "moe.gate_proj_residual.weight"),
        layer(l, "moe.up_proj_residual.weight"),
        layer(l, "moe.down_proj_residual.weight"),
    ]
}

/// `[gate, up, down]` of layer `l`'s dense MLP (masked training layout).
pub fn dense_mlp_tensor_names(l: usize) -> [String; 3] {
    [
        layer(l, "mlp.gate_proj.weight"),
        layer(l, "mlp.up_proj.weight"),
        layer(l, "mlp.down_proj.weight"),
    ]
}

/// `masks.safetensors`: layer `l`'s shared-channel mask `[I]`.
pub fn residual_mask_name(l: usize) -> String {
    layer(l, "mlp.residual_mask")
}

/// `masks.safetensors`: layer `l`'s per-expert channel masks `[N, I]`.
pub fn expert_mask_name(l: usize) -> String {
    layer(l, "mlp.expert_mask")
}

/// `cluster_predictor.{rest}`.
pub fn router(rest: &str) -> String {
    format!("{ROUTER_PREFIX}{rest}")
}

/// The layer index of a `model.layers.{l}.` name.
pub fn layer_index(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("model.layers.")?;
    rest.split('.').next()?.parse().ok()
}

/// The expert index of a `model.layers.{l}.moe.{gate,up,down}_proj_{e}.weight` name.
pub fn expert_index(name: &str) -> Option<usize> {
    let moe = name.split(".moe.").nth(1)?;
    let proj = moe.strip_suffix(".weight")?;
    let idx = proj.rsplit('_').next()?;
    idx.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_parse_back() {
        let [g, _, d] = expert_tensor_names(3, 5);
        assert_eq!(g, "model.layers.3.moe.gate_proj_5.weight");
        assert_eq!(layer_index(&g), Some(3));
        assert_eq!(expert_index(&d), Some(5));
        assert_eq!(expert_index(&shared_tensor_names(1)[0]), None);
        assert_eq!(layer_index(EMBED), None);
    }
}
