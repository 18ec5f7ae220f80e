"""The Read-ME pre-gating router (`cluster_predictor`) in plain torch, and the library's host
router through the C ABI (the reference the torch one is tested against).

The torch router computes a whole sequence causally (no KV cache): what tests and a host that
keeps its own attention state need. Semantics are pregate's: RMSNorm eps 1e-6, rotate-half RoPE
with the model's base, attention scaled by `1 / normalizer`, top-1 = argmax with weight 1, top-k =
the k largest logits (ties to the lower index) with a softmax over them.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import torch
from torch import nn

from . import _lib

PREFIX = "cluster_predictor."
EPS = 1e-6


def _rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE of `x` `[T, heads, d]` at positions 0..T-1 (angles in f64)."""
    t, _, d = x.shape
    half = d // 2
    inv = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(x.dtype)[:, None, :], ang.sin().to(x.dtype)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def select_top_k(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[T, N]` logits -> experts `[T, k]` (int32) and weights `[T, k]` (f32)."""
    if k == 1:
        e = logits.argmax(dim=-1, keepdim=True)
        return e.to(torch.int32), torch.ones(e.shape, dtype=torch.float32, device=logits.device)
    order = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, :k]
    w = torch.softmax(torch.gather(logits, -1, order).float(), dim=-1)
    return order.to(torch.int32), w


def _load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update({k: v for k, v in load_file(str(f)).items() if k.startswith(PREFIX)})
    return out


class ReadMERouter(nn.Module):
    """The Read-ME router of a pregate model directory, in f32."""

    def __init__(self, config: dict, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.dim = int(config["embedding_dim"])
        self.n_head = int(config["n_head"])
        self.normalizer = float(config.get("normalizer", 1.0))
        self.theta = float(config.get("rope_theta", 10000.0))
        self.top_k = int(config.get("router_top_k", 1))
        self.max_len = int(config.get("max_position_embeddings_predictor", 4096))

        def t(name: str) -> nn.Parameter:
            key = PREFIX + name
            if key not in tensors:
                raise KeyError(f"the checkpoint lacks `{key}`")
            return nn.Parameter(tensors[key].float(), requires_grad=False)

        self.embed = t("embed.weight")
        self.input_norm = t("input_layernorm_0.weight")
        self.post_norm = t("post_attention_layernorm_0.weight")
        self.out_norm = t("out_layernorm.weight")
        self.lin = nn.ParameterDict()
        for name in (
            "q_proj_0",
            "k_proj_0",
            "v_proj_0",
            "o_proj_0",
            "proj_1_0",
            "proj_2_0",
            "proj_out",
        ):
            self.lin[name + "_w"] = t(name + ".weight")
            self.lin[name + "_b"] = t(name + ".bias")

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ReadMERouter:
        """Reads `config.json` and the router's tensors of a model directory."""
        d = Path(model_dir)
        config = json.loads((d / "config.json").read_text())
        return cls(config, _load_tensors(d))

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x @ self.lin[name + "_w"].T + self.lin[name + "_b"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Router logits `[T, N]` of one sequence's token ids `[T]` (positions 0..T-1)."""
        t = ids.shape[0]
        if t > self.max_len:
            raise ValueError(f"{t} tokens exceed the router's context of {self.max_len}")
        hd = self.dim // self.n_head
        x = self.embed[ids]
        a = _rms_norm(x, self.input_norm)
        q = _rope(self._linear(a, "q_proj_0").view(t, self.n_head, hd), self.theta)
        k = _rope(self._linear(a, "k_proj_0").view(t, self.n_head, hd), self.theta)
        v = self._linear(a, "v_proj_0").view(t, self.n_head, hd)
        att = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1),
            k.transpose(0, 1),
            v.transpose(0, 1),
            is_causal=True,
            scale=1.0 / self.normalizer,
        )
        h = x + self._linear(att.transpose(0, 1).reshape(t, self.dim), "o_proj_0")
        m = _rms_norm(h, self.post_norm)
        h = h + self._linear(torch.nn.functional.silu(self._linear(m, "proj_1_0")), "proj_2_0")
        return self._linear(_rms_norm(h, self.out_norm), "proj_out")

    def route(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts `[T, k]` (int32) and weights `[T, k]` (f32) of one sequence."""
        return select_top_k(self(ids), self.top_k)


class HostRouter:
    """libpregate's own host router (`pregate_router_*`) for one model directory."""

    def __init__(self, model_dir: str | Path) -> None:
        self.lib = _lib.load()
        ptr = ctypes.c_void_p()
        _lib.check(
            self.lib, self.lib.pregate_router_open(str(model_dir).encode(), ctypes.byref(ptr))
        )
        self._ptr = ptr.value
        n, k = ctypes.c_uint32(), ctypes.c_uint32()
        _lib.check(
            self.lib, self.lib.pregate_router_shape(self._ptr, ctypes.byref(n), ctypes.byref(k))
        )
        self.num_experts, self.top_k = n.value, k.value

    def route(self, ids: list[int], chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Routes one sequence (in chunks of `chunk` tokens through one state, when given)."""
        state = ctypes.c_void_p()
        _lib.check(
            self.lib, self.lib.pregate_router_state_new(self._ptr, len(ids), ctypes.byref(state))
        )
        try:
            ids_t = torch.tensor(ids, dtype=torch.int32)
            e = torch.empty((len(ids), self.top_k), dtype=torch.int32)
            w = torch.empty((len(ids), self.top_k), dtype=torch.float32)
            step = chunk or max(len(ids), 1)
            for s in range(0, len(ids), step):
                n = min(step, len(ids) - s)
                _lib.check(
                    self.lib,
                    self.lib.pregate_router_route(
                        self._ptr,
                        state,
                        ids_t[s:].data_ptr(),
                        n,
                        e[s:].data_ptr(),
                        w[s:].data_ptr(),
                    ),
                )
            return e, w
        finally:
            self.lib.pregate_router_state_free(state)

    def close(self) -> None:
        """Closes the router (idempotent)."""
        if self._ptr is not None:
            self.lib.pregate_router_close(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        if getattr(self, "_ptr", None) is not None:
            self.close()
