"""`PregateMoeForCausalLM`: an unmodified Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE checkpoint served
by vLLM, its routed experts by pregate's expert cache.

Selected with `hf_overrides={"architectures": ["PregateMoeForCausalLM"]}`; the family comes from
the checkpoint's `model_type`. The model is built from vLLM's own layers (embedding, QKV and
row-parallel linears, rotary embedding, paged `Attention`, `RMSNorm`, dense MLPs, LM head) and the
family's description (`FAMILIES`): q/k/v bias, per-head or full-width QK norm, `clip_qkv`, dense
layers among the MoE ones, Qwen2-MoE's shared expert with its sigmoid gate. Each MoE layer routes
in torch exactly as the family does (`gating.route`) and runs its routed experts in
`torch.ops.pregate.moe_layer_routed`: an expert not in a GPU slot is loaded then. After each MoE
layer, the next D MoE layers' own post-attention norm and gate applied to the current hidden state
predict their experts (`torch.ops.pregate.speculate`), and pregate loads the likely ones ahead.

Options come from `additional_config={"pregate": {...}}` (`StockOptions`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from vllm.distributed.utils import split_tensor_along_last_dim
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.vocab_parallel_embedding import (
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from . import ops  # noqa: F401  (registers torch.ops.pregate.*)
from .gating import route
from .model import (
    ExpertCollector,
    PregateCausalLM,
    decoder_attention,
    expert_service,
    read_options,
)
from .ops import MoeService

#: The architecture name a user selects with `hf_overrides`.
ARCHITECTURE = "PregateMoeForCausalLM"

#: The ops a piecewise CUDA graph must split at (their cache decisions are made every step).
SPLITTING_OPS = ("pregate::begin_step", "pregate::moe_layer_routed", "pregate::speculate")


@dataclass(frozen=True)
class Family:
    """What distinguishes a family's decoder layer (every field is read from transformers' model
    code for that family)."""

    #: The checkpoint's `architectures` entry.
    stock: str
    #: The module holding the gate and the experts in checkpoint names.
    moe_module: str
    #: Checkpoint projection name -> gate / up / down.
    proj: dict[str, str]
    #: Config fields: experts per layer, expert width.
    num_experts_key: str
    inter_key: str
    #: Config field (or constant) of the q/k/v bias.
    qkv_bias: str | bool
    #: None, "head" (RMSNorm over each head) or "full" (over the whole q / k width).
    qk_norm: str | None
    #: A shared expert with a sigmoid gate (Qwen2-MoE).
    shared_expert: bool
    #: Renormalise the top-k weights: True, or the config field that says.
    renormalize: str | bool
    #: Dense layers among the MoE ones (`mlp_only_layers`, `decoder_sparse_step`).
    sparse_step: bool
    #: `clip_qkv` honoured.
    clip_qkv: bool
    #: The config's `sliding_window` bounds every layer's attention (Mixtral); the others' window
    #: (`use_sliding_window`, some layers only) is refused.
    sliding_window: bool = False


_QWEN_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}

FAMILIES: dict[str, Family] = {
    "mixtral": Family(
        "MixtralForCausalLM",
        "block_sparse_moe",
        {"w1": "gate", "w3": "up", "w2": "down"},
        "num_local_experts",
        "intermediate_size",
        False,
        None,
        False,
        True,
        False,
        False,
        sliding_window=True,
    ),
    "qwen2_moe": Family(
        "Qwen2MoeForCausalLM",
        "mlp",
        _QWEN_PROJ,
        "num_experts",
        "moe_intermediate_size",
        "qkv_bias",
        None,
        True,
        "norm_topk_prob",
        True,
        False,
    ),
    "qwen3_moe": Family(
        "Qwen3MoeForCausalLM",
        "mlp",
        _QWEN_PROJ,
        "num_experts",
        "moe_intermediate_size",
        "attention_bias",
        "head",
        False,
        "norm_topk_prob",
        True,
        False,
    ),
    "olmoe": Family(
        "OlmoeForCausalLM",
        "mlp",
        _QWEN_PROJ,
        "num_experts",
        "intermediate_size",
        "attention_bias",
        "full",
        False,
        "norm_topk_prob",
        False,
        True,
    ),
}


def _num_experts(config: object, fam: Family) -> int:
    # Qwen3-MoE configs written by some versions name the field num_local_experts.
    for key in (fam.num_experts_key, "num_local_experts", "num_experts"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError(f"{ARCHITECTURE}: the config has no expert count ({fam.num_experts_key})")


def family_of(config: object) -> Family:
    """The family of a checkpoint's config; refuses what pregate does not serve, naming it."""
    mt = getattr(config, "model_type", None)
    fam = FAMILIES.get(str(mt))
    if fam is None:
        raise ValueError(
            f"{ARCHITECTURE} serves the model types {sorted(FAMILIES)}; this checkpoint is "
            f"model_type={mt!r}"
        )
    refused: list[str] = []
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        refused.append(f"hidden_act={act!r} (only silu)")
    if getattr(config, "quantization_config", None):
        refused.append("quantization_config (quantized checkpoints are not served)")
    window = getattr(config, "sliding_window", None)
    if (
        fam.sliding_window
        and window is not None
        and (isinstance(window, bool) or not isinstance(window, int) or window < 1)
    ):
        refused.append(f"sliding_window={window!r} (a positive number of tokens)")
    if getattr(config, "use_sliding_window", False):
        refused.append("use_sliding_window=true (only full attention)")
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        refused.append(f"layer_types {sorted(kinds)} (only full_attention)")
    if fam.clip_qkv is False and getattr(config, "clip_qkv", None) is not None:
        refused.append(f"clip_qkv={config.clip_qkv} (not part of {mt})")
    if refused:
        raise ValueError(f"{ARCHITECTURE} ({mt}): unsupported config: {'; '.join(refused)}")
    _num_experts(config, fam)
    return fam


def sliding_window(config: object, fam: Family) -> int | None:
    """The window of every layer's attention: a query sees itself and the `window - 1` tokens
    before it (transformers' `sliding_window_overlay`, vLLM's `per_layer_sliding_window`)."""
    return getattr(config, "sliding_window", None) if fam.sliding_window else None


def moe_layer_indices(config: object, fam: Family) -> list[int]:
    """The decoder layers that have routed experts."""
    n = int(config.num_hidden_layers)
    if not fam.sparse_step:
        return list(range(n))
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return [i for i in range(n) if i not in dense and (i + 1) % step == 0]


@dataclass(frozen=True)
class StockOptions:
    """pregate's options for `PregateMoeForCausalLM`, from `additional_config={"pregate": {...}}`.

    `cache_slots`: expert slots over all MoE layers (0 and no `cache_bytes`: every expert
    resident); `cache_bytes`: the slot pool in bytes instead (slots = bytes // one expert's bytes
    on this rank); `layer_quota`: slots per layer instead of one shared pool; `policy`: lru, lfu,
    random, belady or belady-decay; `spec_depth`: MoE layers ahead to predict (0: no speculation;
    default 2 with a cache smaller than the experts, else 0); `spec_extra`: candidates per token
    beyond the gating top-k (default 1); `spec_max_loads`: speculative loads per layer (0: no cap
    but the cache); `metrics_port` / `metrics_host`: a Prometheus `/metrics` endpoint (rank r
    serves port + r).
    """

    cache_slots: int = 0
    cache_bytes: int = 0
    layer_quota: int = 0
    policy: str = "belady"
    spec_depth: int | None = None
    spec_extra: int = 1
    spec_max_loads: int = 0
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    @classmethod
    def from_dict(cls, raw: object) -> StockOptions:
        """Reads and checks the options."""
        ints = ("cache_slots", "cache_bytes", "layer_quota", "spec_extra", "spec_max_loads")
        opts = read_options(cls, raw, ints)
        if opts.spec_depth is not None and not (
            isinstance(opts.spec_depth, int) and 0 <= opts.spec_depth <= 4
        ):
            raise ValueError(
                f'additional_config["pregate"]["spec_depth"] = {opts.spec_depth!r}: 0..4'
            )
        if opts.spec_extra > 8:
            raise ValueError(
                f'additional_config["pregate"]["spec_extra"] = {opts.spec_extra}: 0..8'
            )
        if opts.cache_slots and opts.cache_bytes:
            raise ValueError(
                'additional_config["pregate"]: give cache_slots or cache_bytes, not both'
            )
        return opts

    def slots(self, layers: int, experts: int, top_k: int, expert_bytes: int) -> tuple[int, int]:
        """(cache_slots, layer_quota) for the service; refuses a cache that cannot hold one
        token's experts (a layer would never run)."""
        total = self.cache_slots
        if self.cache_bytes:
            total = self.cache_bytes // expert_bytes
            if total == 0:
                raise ValueError(
                    f'additional_config["pregate"]["cache_bytes"] = {self.cache_bytes} holds no '
                    f"expert of {expert_bytes} bytes"
                )
        if total and total < top_k:
            raise ValueError(
                f"an expert cache of {total} slots cannot hold one token's {top_k} experts: give "
                f"at least {top_k} slots ({top_k * expert_bytes} bytes)"
            )
        if self.layer_quota and self.layer_quota < top_k:
            raise ValueError(
                f'additional_config["pregate"]["layer_quota"] = {self.layer_quota} cannot hold '
                f"one token's {top_k} experts"
            )
        if self.layer_quota and total and total != self.layer_quota * layers:
            raise ValueError(
                f"cache of {total} slots and layer_quota {self.layer_quota} over {layers} MoE "
                f"layers disagree (give one of them)"
            )
        return (0 if self.layer_quota else total), self.layer_quota

    def depth(self, cached: bool) -> int:
        """The speculation depth: as given, else 2 with a cache smaller than the experts."""
        if self.spec_depth is not None:
            return self.spec_depth
        return 2 if cached else 0


class StockAttention(nn.Module):
    """The families' attention from vLLM layers: q/k/v bias, QK norm and clip_qkv as the family
    has them."""

    def __init__(self, vllm_config: VllmConfig, fam: Family, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        tp = get_tensor_model_parallel_world_size()
        self.tp, self.rank = tp, get_tensor_model_parallel_rank()
        h = int(config.hidden_size)
        n_heads = int(config.num_attention_heads)
        n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or h // n_heads)
        if n_heads % tp or (n_kv % tp and tp % n_kv):
            raise ValueError(
                f"{n_heads} attention heads / {n_kv} KV heads do not split over "
                f"tensor_parallel_size={tp}"
            )
        self.q_size = n_heads // tp * self.head_dim
        self.kv_size = max(1, n_kv // tp) * self.head_dim
        # With fewer KV heads than ranks, vLLM gives rank r KV head r // kv_replicas.
        self.kv_replicas = max(1, tp // n_kv)
        bias = fam.qkv_bias if isinstance(fam.qkv_bias, bool) else None
        if bias is None:
            # Qwen2-MoE configs before transformers 5 have no qkv_bias field: always biased.
            bias = bool(getattr(config, fam.qkv_bias, fam.qkv_bias == "qkv_bias"))
        o_bias = bias and fam.qkv_bias == "attention_bias"
        self.qkv_proj = QKVParallelLinear(
            h, self.head_dim, n_heads, n_kv, bias=bias, prefix=f"{prefix}.qkv_proj"
        )
        self.o_proj = RowParallelLinear(
            n_heads * self.head_dim, h, bias=o_bias, prefix=f"{prefix}.o_proj"
        )
        eps = float(config.rms_norm_eps)
        self.qk_norm = fam.qk_norm
        if fam.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, eps=eps)
            self.k_norm = RMSNorm(self.head_dim, eps=eps)
        elif fam.qk_norm == "full":
            self.q_norm = RMSNorm(n_heads * self.head_dim, eps=eps)
            self.k_norm = RMSNorm(n_kv * self.head_dim, eps=eps)
        clip = getattr(config, "clip_qkv", None) if fam.clip_qkv else None
        self.clip = None if clip is None else float(clip)
        self.rotary_emb, self.attn = decoder_attention(
            vllm_config, self.head_dim, n_heads, n_kv, prefix, sliding_window(config, fam)
        )

    def _norm_full(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The norm is over every head's width: gather the ranks' heads, norm, take ours back.
        # Replicated KV heads appear once per replica in the gather: the norm takes each once.
        if self.tp == 1:
            return self.q_norm(q), self.k_norm(k)
        rep = self.kv_replicas
        q = tensor_model_parallel_all_gather(q.contiguous())
        k = tensor_model_parallel_all_gather(k.contiguous())
        if rep > 1:
            k = torch.cat(split_tensor_along_last_dim(k, self.tp)[::rep], dim=-1)
        q, k = self.q_norm(q), self.k_norm(k)
        q = split_tensor_along_last_dim(q, self.tp)[self.rank]
        k = split_tensor_along_last_dim(k, self.tp // rep)[self.rank // rep]
        return q, k

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Attention output of the normed hidden state `x`."""
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm == "head":
            d = self.head_dim
            q = self.q_norm(q.reshape(-1, q.shape[-1] // d, d)).reshape(q.shape)
            k = self.k_norm(k.reshape(-1, k.shape[-1] // d, d)).reshape(k.shape)
        elif self.qk_norm == "full":
            q, k = self._norm_full(q, k)
        if self.clip is not None:
            # After the norm, before RoPE, as OLMoE does.
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k = self.rotary_emb(positions, q, k)
        o, _ = self.o_proj(self.attn(q, k, v))
        return o


class DenseMLP(nn.Module):
    """A SwiGLU MLP from vLLM's parallel linears; its output is this rank's partial sum."""

    def __init__(self, hidden: int, inter: int, prefix: str) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden, [inter] * 2, bias=False, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            inter, hidden, bias=False, reduce_results=False, prefix=f"{prefix}.down_proj"
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP of `x` (not yet all-reduced)."""
        gu, _ = self.gate_up_proj(x)
        y, _ = self.down_proj(self.act(gu))
        return y


class StockDecoderLayer(nn.Module):
    """Attention, then either a dense MLP or the routed experts (pregate's) with the family's
    gate, and Qwen2-MoE's gated shared expert."""

    def __init__(
        self, vllm_config: VllmConfig, fam: Family, layer: int, moe_index: int | None, prefix: str
    ) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        h = int(config.hidden_size)
        eps = float(config.rms_norm_eps)
        self.tp = get_tensor_model_parallel_world_size()
        self.moe_index = moe_index
        self.self_attn = StockAttention(vllm_config, fam, prefix=f"{prefix}.self_attn")
        self.input_layernorm = RMSNorm(h, eps=eps)
        self.post_attention_layernorm = RMSNorm(h, eps=eps)
        self.top_k = int(config.num_experts_per_tok)
        ren = fam.renormalize
        self.renormalize = ren if isinstance(ren, bool) else bool(getattr(config, ren, False))
        self.mlp: DenseMLP | None = None
        self.gate: ReplicatedLinear | None = None
        self.shared_mlp: DenseMLP | None = None
        self.shared_expert_gate: ReplicatedLinear | None = None
        if moe_index is None:
            self.mlp = DenseMLP(h, int(config.intermediate_size), prefix=f"{prefix}.mlp")
            return
        # Replicated: every rank computes the same routes, so their caches decide alike.
        self.gate = ReplicatedLinear(
            h, _num_experts(config, fam), bias=False, prefix=f"{prefix}.gate"
        )
        if fam.shared_expert and int(getattr(config, "shared_expert_intermediate_size", 0) or 0):
            self.shared_mlp = DenseMLP(
                h, int(config.shared_expert_intermediate_size), prefix=f"{prefix}.shared_mlp"
            )
            self.shared_expert_gate = ReplicatedLinear(
                h, 1, bias=False, prefix=f"{prefix}.shared_expert_gate"
            )

    def gate_logits(self, y: torch.Tensor) -> torch.Tensor:
        """The layer's gate logits of the normed hidden state `y`."""
        if self.gate is None:
            raise ValueError("a dense layer has no gate")
        logits, _ = self.gate(y)
        return logits

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, step: torch.Tensor, handle: int
    ) -> torch.Tensor:
        """The layer's output (`hidden` plus attention plus MLP or experts)."""
        hidden = hidden + self.self_attn(positions, self.input_layernorm(hidden))
        y = self.post_attention_layernorm(hidden)
        if self.mlp is not None:
            out = self.mlp(y)
        else:
            ids, w = route(self.gate_logits(y), self.top_k, self.renormalize)
            out = torch.ops.pregate.moe_layer_routed(y, ids, w, step, self.moe_index, handle)
            if self.shared_mlp is not None and self.shared_expert_gate is not None:
                g, _ = self.shared_expert_gate(y)
                out = out + torch.sigmoid(g) * self.shared_mlp(y)
        if self.tp > 1:
            out = tensor_model_parallel_all_reduce(out)
        return hidden + out


_LAYER = re.compile(r"layers\.(\d+)\.(.+)$")


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0},
)
class StockMoeModel(nn.Module):
    """Embedding, decoder layers, final norm; the routed experts in a pregate `MoeService`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.family = fam = family_of(config)
        extra = vllm_config.additional_config
        raw = extra.get("pregate", {}) if isinstance(extra, dict) else {}
        self.options = opts = StockOptions.from_dict(raw)
        self.tp, self.rank = (
            get_tensor_model_parallel_world_size(),
            get_tensor_model_parallel_rank(),
        )
        self.moe_layers = moe_layer_indices(config, fam)
        if not self.moe_layers:
            raise ValueError(f"{ARCHITECTURE}: the checkpoint has no MoE layer")
        n_experts = _num_experts(config, fam)
        self.top_k = int(config.num_experts_per_tok)
        inter = int(getattr(config, fam.inter_key))
        if inter % self.tp:
            raise ValueError(
                f"expert width {fam.inter_key}={inter} does not split over "
                f"tensor_parallel_size={self.tp}"
            )
        h = int(config.hidden_size)
        moe_index = {layer: i for i, layer in enumerate(self.moe_layers)}
        self.embed_tokens = VocabParallelEmbedding(int(config.vocab_size), h)
        self.layers = nn.ModuleList(
            StockDecoderLayer(vllm_config, fam, i, moe_index.get(i), prefix=f"{prefix}.layers.{i}")
            for i in range(int(config.num_hidden_layers))
        )
        self.norm = RMSNorm(h, eps=float(config.rms_norm_eps))
        dtype = vllm_config.model_config.dtype
        expert_bytes = 3 * h * (inter // self.tp) * torch.empty((), dtype=dtype).element_size()
        slots, quota = opts.slots(len(self.moe_layers), n_experts, self.top_k, expert_bytes)
        units = len(self.moe_layers) * n_experts
        cached = 0 < slots < units or 0 < quota < n_experts
        self.spec_depth = opts.depth(cached)
        self.experts = expert_service(
            vllm_config,
            self.tp,
            self.rank,
            num_layers=len(self.moe_layers),
            num_experts=n_experts,
            top_k=self.top_k,
            hidden=h,
            inter=inter // self.tp,
            cache_slots=slots,
            layer_quota=quota,
            policy=opts.policy,
        )
        if self.spec_depth:
            self.experts.configure_speculation(
                self.spec_depth, opts.spec_extra, opts.spec_max_loads
            )
        # A plain int: the ops take it as a constant, and compiled graphs keep it.
        self.handle = self.experts.handle
        self._collector = ExpertCollector(self.experts, inter, self.tp, self.rank)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings of `input_ids`."""
        return self.embed_tokens(input_ids)

    def _predict(self, moe_index: int, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.layers[self.moe_layers[moe_index]]
        p = torch.softmax(layer.gate_logits(layer.post_attention_layernorm(hidden)).float(), -1)
        # A non-finite hidden state (vLLM's warm-up, see `gating`) predicts nothing; the library
        # refuses NaN scores.
        return torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states of the step's tokens."""
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        step = torch.ops.pregate.begin_step(hidden, self.handle)
        n_moe = len(self.moe_layers)
        for layer in self.layers:
            hidden = layer(positions, hidden, step, self.handle)
            m = layer.moe_index
            if m is None or not self.spec_depth:
                continue
            depth = min(self.spec_depth, n_moe - 1 - m)
            if depth > 0:
                scores = torch.stack([self._predict(m + j, hidden) for j in range(1, depth + 1)])
                step = torch.ops.pregate.speculate(scores, step, m, self.top_k, self.handle)
        return self.norm(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads attention, norms, gates and dense MLPs into vLLM parameters and the routed
        experts into pregate's store, then finalizes it (naming any expert the checkpoint
        lacks)."""
        fam = self.family
        expert = re.compile(
            rf"layers\.(\d+)\.{fam.moe_module}\.experts\.(\d+)\.({'|'.join(fam.proj)})\.weight$"
        )
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        moe = set(self.moe_layers)
        for name, w in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            local = name[len("model.") :] if name.startswith("model.") else name
            if m := expert.match(local):
                layer = int(m[1])
                if layer not in moe:
                    raise ValueError(f"checkpoint tensor {name}: layer {layer} has no experts")
                slot = self.moe_layers.index(layer)
                self._collector.take(layer, slot, int(m[2]), fam.proj[m[3]], w)
                continue
            target, shard = self._place(local)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name} has no place in {ARCHITECTURE}")
            param = params[target]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, w) if shard is None else loader(param, w, shard)
            loaded.add(target)
        ckpt = {p: name for name, p in fam.proj.items()}
        pattern = f"model.layers.{{}}.{fam.moe_module}.experts.{{}}.{{}}.weight"
        self._collector.finish(lambda layer, e, p: pattern.format(layer, e, ckpt[p]))
        return loaded

    def _place(self, local: str) -> tuple[str, str | int | None]:
        """A checkpoint name (without `model.`) -> (parameter name, shard id or None)."""
        m = _LAYER.match(local)
        if m is None:
            return local, None
        i, rest = m[1], m[2]
        moe = self.family.moe_module
        if mm := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
            return f"layers.{i}.self_attn.qkv_proj.{mm[2]}", mm[1]
        if rest == f"{moe}.gate.weight":
            return f"layers.{i}.gate.weight", None
        if rest == "mlp.shared_expert_gate.weight":
            return f"layers.{i}.shared_expert_gate.weight", None
        if mm := re.fullmatch(r"mlp\.(shared_expert\.)?(gate|up|down)_proj\.weight", rest):
            module = "shared_mlp" if mm[1] else "mlp"
            if mm[2] == "down":
                return f"layers.{i}.{module}.down_proj.weight", None
            return f"layers.{i}.{module}.gate_up_proj.weight", 0 if mm[2] == "gate" else 1
        return local, None


class PregateMoeForCausalLM(PregateCausalLM):
    """A stock Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE checkpoint served by vLLM, its routed
    experts by pregate's expert cache."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(
            vllm_config=vllm_config,
            prefix=prefix,
            model_cls=StockMoeModel,
            arch=ARCHITECTURE,
            splitting_ops=SPLITTING_OPS,
        )


def stock_stats(model: nn.Module) -> dict[str, object]:
    """A rank's expert counters plus speculation's (`speculation`: depth, recall per distance,
    loads, used, wasted), for `LLM.apply_model` (a module-level function, which worker processes
    can import)."""
    experts: MoeService = model.experts
    return {**experts.stats(), "speculation": experts.speculation_stats()}
