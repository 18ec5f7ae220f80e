"""`ReadMEForCausalLM`: a Read-ME model inside vLLM, built from vLLM's own layers.

The backbone is a Llama (vLLM's embedding, QKV and row-parallel linears, rotary embedding, paged
`Attention`, RMSNorm, LM head). The Read-ME router (`cluster_predictor`) is a vLLM module too: its
attention is a vLLM `Attention` layer, so vLLM pages the router's KV like any other layer's, and
chunked prefill, prefix caching and preemption need nothing from pregate. The router runs once per
step, before layer 0; its routes (shared by every layer) are planned by `pregate::plan_step`, and
each layer's routed experts run in `pregate::moe_layer` over libpregate's expert store. A residual
(always active) expert, when the checkpoint has one, is a vLLM dense MLP.

Options come from `additional_config={"pregate": {...}}` (`PregateOptions`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_reduce,
)
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.sequence import IntermediateTensors

from . import ops  # noqa: F401  (registers torch.ops.pregate.*)
from ._lib import POLICIES
from .ops import MoeService
from .router import EPS as ROUTER_EPS
from .router import select_top_k

#: The custom ops a piecewise CUDA graph must split at (their host-side cache decisions must run
#: every step, not be replayed from a capture).
SPLITTING_OPS = ("pregate::plan_step", "pregate::moe_layer")

_EXPERT = re.compile(r"model\.layers\.(\d+)\.moe\.(gate|up|down)_proj_(\d+)\.weight$")
_Options = TypeVar("_Options")
_RESIDUAL = re.compile(r"model\.layers\.(\d+)\.moe\.(gate|up|down)_proj_residual\.weight$")


def read_options(cls: type[_Options], raw: object, ints: tuple[str, ...]) -> _Options:
    """`additional_config["pregate"]` as the options dataclass `cls`, checked for what every
    pregate architecture shares: a dict of known keys, the integers `ints` >= 0 (not booleans), an
    eviction policy pregate has, a metrics port."""
    if not isinstance(raw, dict):
        raise ValueError(f'additional_config["pregate"] must be a dict, not {type(raw).__name__}')
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(
            f'additional_config["pregate"] has unknown keys {unknown}; known: {sorted(known)}'
        )
    opts = cls(**raw)
    for name in ints:
        v = getattr(opts, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f'additional_config["pregate"]["{name}"] = {v!r}: an integer >= 0')
    policy = opts.policy
    if policy not in POLICIES:
        raise ValueError(
            f'additional_config["pregate"]["policy"] = {policy!r}: one of {list(POLICIES)}'
        )
    port = opts.metrics_port
    if port is not None and not (isinstance(port, int) and 0 <= port < 65536):
        raise ValueError(f'additional_config["pregate"]["metrics_port"] = {port!r}: a port')
    return opts


@dataclass(frozen=True)
class PregateOptions:
    """pregate's options, from `additional_config={"pregate": {...}}`.

    `cache_slots`: expert slots over all layers (0: every expert resident); `layer_quota`: slots
    per layer instead of one shared pool; `policy`: lru, lfu, random, belady or belady-decay;
    `metrics_port`: a port for a Prometheus `/metrics` endpoint of the expert cache (rank r serves
    port + r; None: no endpoint); `metrics_host`: the address it binds.
    """

    cache_slots: int = 0
    layer_quota: int = 0
    policy: str = "belady"
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"

    @classmethod
    def from_vllm(cls, vllm_config: VllmConfig) -> PregateOptions:
        """Reads and checks `additional_config["pregate"]`."""
        extra = vllm_config.additional_config
        raw = extra.get("pregate", {}) if isinstance(extra, dict) else {}
        return read_options(cls, raw, ("cache_slots", "layer_quota"))


def check_cudagraph_policy(
    vllm_config: VllmConfig,
    arch: str = "ReadMEForCausalLM",
    splitting_ops: tuple[str, ...] = SPLITTING_OPS,
) -> None:
    """Refuses CUDA-graph settings that would replay a captured step's expert-cache decisions.

    `plan_step` and `moe_layer` decide on the host, every step, which experts are resident and
    where; a graph captured around them would replay one step's slots forever. Safe: eager
    (`enforce_eager=True`), no graphs captured at all (vLLM's CPU platform captures none), or
    `cudagraph_mode="PIECEWISE"` with both pregate ops in `splitting_ops`.
    """
    cc = vllm_config.compilation_config
    if vllm_config.model_config.enforce_eager or not cc.cudagraph_capture_sizes:
        return
    mode = cc.cudagraph_mode
    if mode is None or mode.name == "NONE":
        return
    names = ", ".join(f'"{op}"' for op in splitting_ops)
    flags = (
        'enforce_eager=True, or compilation_config={"cudagraph_mode": "PIECEWISE", '
        f'"splitting_ops": [<vLLM\'s attention ops>, {names}]}}'
    )
    if mode.has_full_cudagraphs():
        raise ValueError(
            f"{arch}: cudagraph_mode={mode.name} captures whole steps, which would "
            f"replay stale expert-cache decisions; use {flags}"
        )
    missing = [op for op in splitting_ops if op not in (cc.splitting_ops or [])]
    if missing:
        raise ValueError(
            f"{arch}: cudagraph_mode={mode.name} without {missing} in splitting_ops "
            f"would capture pregate's ops in a graph; use {flags}"
        )


def _checkpoint_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, from the safetensors headers (no tensor data is read)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ValueError(
            f"ReadMEForCausalLM reads expert widths from a local model directory; {model_dir!r} "
            "is not one (download it first)"
        )
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir} holds no .safetensors file")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(meta["shape"])
    return shapes


def _rope_parameters(config: object) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.setdefault("rope_theta", float(getattr(config, "rope_theta", 10000.0)))
    params.setdefault("rope_type", "default")
    return params


def decoder_attention(
    vllm_config: VllmConfig,
    head_dim: int,
    n_heads: int,
    n_kv: int,
    prefix: str,
    sliding_window: int | None = None,
) -> tuple[nn.Module, Attention]:
    """A decoder layer's rotary embedding and vLLM attention (GQA, scale 1/sqrt(head size),
    neox-style RoPE from the model's config), this rank's share of the heads; an optional sliding
    window of that many tokens."""
    config = vllm_config.model_config.hf_config
    tp = get_tensor_model_parallel_world_size()
    rope = get_rope(
        head_dim,
        max_position=int(getattr(config, "max_position_embeddings", 4096)),
        rope_parameters=_rope_parameters(config),
        is_neox_style=True,
    )
    attn = Attention(
        n_heads // tp,
        head_dim,
        head_dim**-0.5,
        num_kv_heads=max(1, n_kv // tp),
        cache_config=vllm_config.cache_config,
        per_layer_sliding_window=sliding_window,
        prefix=f"{prefix}.attn",
    )
    return rope, attn


def expert_service(vllm_config: VllmConfig, tp: int, rank: int, **service: object) -> MoeService:
    """pregate's expert service on this worker's device for tensor-parallel rank `rank` of `tp`
    (each expert sliced over its width); `service`: the model's own `MoeService` arguments (layers,
    experts, top-k, widths, cache)."""
    device = torch.device(vllm_config.device_config.device or "cpu")
    if device.type == "cuda" and device.index is None:
        # Each worker has made its own GPU current; "cuda" alone would mean GPU 0 on every rank.
        device = torch.device("cuda", torch.cuda.current_device())
    return MoeService(
        dtype=vllm_config.model_config.dtype,
        device=device,
        max_tokens=int(vllm_config.scheduler_config.max_num_batched_tokens or 0),
        shard_kind=1 if tp > 1 else 0,
        shard_rank=rank,
        shard_size=tp,
        **service,  # type: ignore[arg-type]
    )


class ExpertCollector:
    """Collects each routed expert's three projections from the checkpoint's stream of tensors
    (in any order) and hands this rank's slice to pregate's store once all three are there: gate
    and up rows, down columns (tensor parallel splits the intermediate width)."""

    def __init__(self, experts: MoeService, inter: int, tp: int, rank: int) -> None:
        self.experts = experts
        self.width = inter // tp
        self.lo = rank * self.width
        self._pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def take(self, layer: int, slot: int, expert: int, proj: str, w: torch.Tensor) -> None:
        """Projection `proj` (gate, up or down) of `expert` in checkpoint layer `layer`, the
        service's layer `slot`."""
        part = self._pending.setdefault((layer, expert), {})
        part[proj] = w
        if len(part) < 3:
            return
        del self._pending[(layer, expert)]
        lo, n = self.lo, self.width
        self.experts.set_expert(
            slot,
            expert,
            part["gate"][lo : lo + n],
            part["up"][lo : lo + n],
            part["down"][:, lo : lo + n],
        )

    def finish(self, name_of: Callable[[int, int, str], str] | None = None) -> None:
        """Finalizes the service, or names an expert whose projections the checkpoint lacks
        (`name_of(layer, expert, proj)`: the checkpoint name of the first one missing)."""
        if self._pending:
            (layer, e), part = next(iter(self._pending.items()))
            lacking = sorted({"gate", "up", "down"} - set(part))
            where = f" ({name_of(layer, e, lacking[0])})" if name_of else ""
            raise ValueError(
                f"the checkpoint lacks expert projections: (layer {layer}, expert {e}) has no "
                f"{lacking}{where}"
            )
        self.experts.finalize()


class ReadMERouterModule(nn.Module):
    """The Read-ME `cluster_predictor` from vLLM layers, replicated on every tensor-parallel rank
    so that every rank computes the same routes (and makes the same cache decisions)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        dim, inter = int(config.embedding_dim), int(config.inter_dim)
        self.n_head = int(config.n_head)
        self.head_dim = dim // self.n_head
        self.top_k = int(getattr(config, "router_top_k", 1))

        def lin(i: int, o: int, name: str) -> ReplicatedLinear:
            return ReplicatedLinear(i, o, bias=True, prefix=f"{prefix}.{name}")

        self.embed = nn.Parameter(torch.empty(int(config.vocab_size), dim), requires_grad=False)
        self.input_layernorm_0 = RMSNorm(dim, eps=ROUTER_EPS)
        self.q_proj_0 = lin(dim, dim, "q_proj_0")
        self.k_proj_0 = lin(dim, dim, "k_proj_0")
        self.v_proj_0 = lin(dim, dim, "v_proj_0")
        self.o_proj_0 = lin(dim, dim, "o_proj_0")
        self.post_attention_layernorm_0 = RMSNorm(dim, eps=ROUTER_EPS)
        self.proj_1_0 = lin(dim, inter, "proj_1_0")
        self.proj_2_0 = lin(inter, dim, "proj_2_0")
        self.out_layernorm = RMSNorm(dim, eps=ROUTER_EPS)
        self.proj_out = lin(dim, int(config.N_cluster), "proj_out")
        self.rotary_emb = get_rope(
            self.head_dim,
            max_position=int(getattr(config, "max_position_embeddings_predictor", 4096)),
            rope_parameters=_rope_parameters(config),
            is_neox_style=True,
        )
        # Read-ME divides attention logits by `normalizer`, not by sqrt(head size). vLLM orders
        # KV caches by the one integer in an attention layer's name: the router's comes after the
        # backbone's layers.
        self.attn = Attention(
            self.n_head,
            self.head_dim,
            1.0 / float(getattr(config, "normalizer", 1.0)),
            num_kv_heads=self.n_head,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.{int(config.num_hidden_layers)}.attn",
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Router logits `[T, N]` of the step's tokens (their KV appended to the router's)."""
        x = nn.functional.embedding(input_ids, self.embed)
        a = self.input_layernorm_0(x)
        q, _ = self.q_proj_0(a)
        k, _ = self.k_proj_0(a)
        v, _ = self.v_proj_0(a)
        q, k = self.rotary_emb(positions, q, k)
        o, _ = self.o_proj_0(self.attn(q, k, v))
        h = x + o
        m, _ = self.proj_1_0(self.post_attention_layernorm_0(h))
        m, _ = self.proj_2_0(nn.functional.silu(m))
        logits, _ = self.proj_out(self.out_layernorm(h + m))
        return logits

    def load(self, name: str, w: torch.Tensor) -> str:
        """Loads the checkpoint tensor `cluster_predictor.<name>`; returns the parameter's name."""
        if name == "embed.weight":
            self.embed.data.copy_(w)
            return "embed"
        param = self.get_parameter(name)
        getattr(param, "weight_loader", default_weight_loader)(param, w)
        return name


class ReadMEDecoderLayer(nn.Module):
    """Attention (vLLM's) and the layer's experts (pregate's, plus a residual dense MLP)."""

    def __init__(
        self, vllm_config: VllmConfig, layer: int, residual_inter: int, prefix: str
    ) -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        tp = get_tensor_model_parallel_world_size()
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
        self.layer = layer
        self.tp = tp
        self.qkv_proj = QKVParallelLinear(
            h, self.head_dim, n_heads, n_kv, bias=False, prefix=f"{prefix}.qkv_proj"
        )
        self.o_proj = RowParallelLinear(
            n_heads * self.head_dim, h, bias=False, prefix=f"{prefix}.o_proj"
        )
        self.rotary_emb, self.attn = decoder_attention(
            vllm_config, self.head_dim, n_heads, n_kv, prefix
        )
        eps = float(config.rms_norm_eps)
        self.input_layernorm = RMSNorm(h, eps=eps)
        self.post_attention_layernorm = RMSNorm(h, eps=eps)
        # The residual part all-reduces together with the experts' partial sums.
        self.residual_mlp: nn.ModuleDict | None = None
        if residual_inter:
            self.residual_mlp = nn.ModuleDict(
                {
                    "gate_up_proj": MergedColumnParallelLinear(
                        h, [residual_inter] * 2, bias=False, prefix=f"{prefix}.moe.gate_up_proj"
                    ),
                    "down_proj": RowParallelLinear(
                        residual_inter,
                        h,
                        bias=False,
                        reduce_results=False,
                        prefix=f"{prefix}.moe.down_proj",
                    ),
                }
            )
            self.act = SiluAndMul()

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_w: torch.Tensor,
        step: torch.Tensor,
        handle: int,
    ) -> torch.Tensor:
        """The layer's output (`hidden` plus attention plus experts)."""
        qkv, _ = self.qkv_proj(self.input_layernorm(hidden))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        o, _ = self.o_proj(self.attn(q, k, v))
        hidden = hidden + o
        y = self.post_attention_layernorm(hidden)
        out = torch.ops.pregate.moe_layer(y, topk_ids, topk_w, step, self.layer, handle)
        if self.residual_mlp is not None:
            gu, _ = self.residual_mlp["gate_up_proj"](y)
            r, _ = self.residual_mlp["down_proj"](self.act(gu))
            out = out + r
        if self.tp > 1:
            out = tensor_model_parallel_all_reduce(out)
        return hidden + out


@support_torch_compile(
    dynamic_arg_dims={"input_ids": 0, "positions": 0, "inputs_embeds": 0},
)
class ReadMEModel(nn.Module):
    """Embedding, router, decoder layers and the final norm."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.options = PregateOptions.from_vllm(vllm_config)
        shapes = _checkpoint_shapes(vllm_config.model_config.model)
        n_layers = int(config.num_hidden_layers)
        n_experts = int(config.N_cluster)
        self.n_experts = n_experts
        self.tp, self.rank = (
            get_tensor_model_parallel_world_size(),
            get_tensor_model_parallel_rank(),
        )
        inter = {
            shapes.get(f"model.layers.{i}.moe.gate_proj_0.weight", (0,))[0] for i in range(n_layers)
        }
        if len(inter) != 1 or 0 in inter:
            raise ValueError(
                f"{vllm_config.model_config.model}: every layer needs experts of one width "
                f"(model.layers.<l>.moe.gate_proj_0.weight); found widths {sorted(inter)}"
            )
        self.expert_inter = inter.pop()
        if self.expert_inter % self.tp:
            raise ValueError(
                f"expert width {self.expert_inter} does not split over "
                f"tensor_parallel_size={self.tp}"
            )
        self.embed_tokens = VocabParallelEmbedding(int(config.vocab_size), int(config.hidden_size))
        self.router = ReadMERouterModule(vllm_config, prefix=f"{prefix}.router")
        self.layers = nn.ModuleList(
            ReadMEDecoderLayer(
                vllm_config,
                i,
                shapes.get(f"model.layers.{i}.moe.gate_proj_residual.weight", (0,))[0],
                prefix=f"{prefix}.layers.{i}",
            )
            for i in range(n_layers)
        )
        self.norm = RMSNorm(int(config.hidden_size), eps=float(config.rms_norm_eps))
        self.experts = expert_service(
            vllm_config,
            self.tp,
            self.rank,
            num_layers=n_layers,
            num_experts=n_experts,
            top_k=self.router.top_k,
            hidden=int(config.hidden_size),
            inter=self.expert_inter // self.tp,
            cache_slots=self.options.cache_slots,
            layer_quota=self.options.layer_quota,
            policy=self.options.policy,
        )
        # A plain int: the ops take it as a constant, and compiled graphs keep it.
        self.handle = self.experts.handle
        self._collector = ExpertCollector(self.experts, self.expert_inter, self.tp, self.rank)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings of `input_ids`."""
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states of the step's tokens."""
        if input_ids is None:
            raise ValueError("Read-ME routes from token ids; prompt embeddings are not supported")
        # Routes once per step, before the backbone, for every layer.
        topk_ids, topk_w = select_top_k(self.router(input_ids, positions), self.router.top_k)
        step = torch.ops.pregate.plan_step(topk_ids, topk_w, self.handle)
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden, topk_ids, topk_w, step, self.handle)
        return self.norm(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads the backbone and router into vLLM parameters and the experts into pregate's
        store, then finalizes the store (which names any expert the checkpoint lacks)."""
        loaded: set[str] = set()
        params = dict(self.named_parameters())
        for name, w in weights:
            if name.startswith("cluster_predictor."):
                loaded.add("router." + self.router.load(name[len("cluster_predictor.") :], w))
                continue
            if m := _EXPERT.match(name):
                layer = int(m[1])
                self._collector.take(layer, layer, int(m[3]), m[2], w)
                continue
            if not name.startswith("model."):
                continue
            local = name[len("model.") :]
            if m := _RESIDUAL.match(name):
                layer, proj = int(m[1]), m[2]
                key = "down_proj" if proj == "down" else "gate_up_proj"
                local = f"layers.{layer}.residual_mlp.{key}.weight"
                shard = None if proj == "down" else (0 if proj == "gate" else 1)
            elif m := re.match(r"(layers\.\d+)\.self_attn\.([qkv])_proj\.weight$", local):
                local, shard = f"{m[1]}.qkv_proj.weight", m[2]
            else:
                local = local.replace(".self_attn.o_proj.", ".o_proj.")
                shard = None
            if local not in params:
                raise ValueError(f"checkpoint tensor {name} has no place in ReadMEForCausalLM")
            param = params[local]
            loader = getattr(param, "weight_loader", default_weight_loader)
            loader(param, w) if shard is None else loader(param, w, shard)
            loaded.add(local)
        self._collector.finish(lambda layer, e, p: f"model.layers.{layer}.moe.{p}_proj_{e}.weight")
        return loaded


class PregateCausalLM(nn.Module):
    """The causal-LM wrapper vLLM sees, shared by pregate's architectures: an inner model (whose
    routed experts are pregate's service), vLLM's LM head and logits processor, and the optional
    `/metrics` endpoint. A subclass names its inner model class, architecture and splitting ops."""

    def __init__(
        self,
        *,
        vllm_config: VllmConfig,
        prefix: str,
        model_cls: type[nn.Module],
        arch: str,
        splitting_ops: tuple[str, ...],
    ) -> None:
        super().__init__()
        check_cudagraph_policy(vllm_config, arch, splitting_ops)
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = model_cls(vllm_config=vllm_config, prefix=_join(prefix, "model"))
        self.lm_head = ParallelLMHead(
            int(config.vocab_size), int(config.hidden_size), prefix=_join(prefix, "lm_head")
        )
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(int(config.vocab_size))
        self._metrics = None
        opts = self.model.options
        if opts.metrics_port is not None:
            from .metrics import MetricsServer

            self._metrics = MetricsServer(
                self.model.experts, opts.metrics_host, opts.metrics_port + self.model.rank
            )

    @property
    def experts(self) -> MoeService:
        """pregate's expert service of this rank (counters: `experts.stats()`)."""
        return self.model.experts

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The token embeddings of `input_ids`."""
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The final hidden states of the step's tokens."""
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """Next-token logits."""
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads the LM head here (unless tied) and every other tensor through the inner model's
        `load_weights`."""
        tied = getattr(self.config, "tie_word_embeddings", False)
        loaded: set[str] = set()
        rest = []
        for name, w in weights:
            if name == "lm_head.weight":
                if not tied:
                    param = self.lm_head.weight
                    getattr(param, "weight_loader", default_weight_loader)(param, w)
                loaded.add(name)
            else:
                rest.append((name, w))
        loaded |= {"model." + n for n in self.model.load_weights(rest)}
        if tied:
            loaded.add("lm_head.weight")
        return loaded


class ReadMEForCausalLM(PregateCausalLM):
    """A Read-ME model (pregate's model format) served by vLLM, its experts by pregate."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(
            vllm_config=vllm_config,
            prefix=prefix,
            model_cls=ReadMEModel,
            arch="ReadMEForCausalLM",
            splitting_ops=SPLITTING_OPS,
        )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def expert_stats(model: nn.Module) -> dict[str, float]:
    """A rank's expert counters (hits, misses, evictions, waves, ...).

    `LLM.apply_model(expert_stats)` gives one dict per rank: worker processes can import this
    function, where a lambda cannot be sent to them."""
    return model.experts.stats()
