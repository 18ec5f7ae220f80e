"""pregate's expert runtime as torch custom ops, importable without vLLM.

A `MoeService` holds one libpregate MoE service (every MoE layer of a model). Its integer `handle`
is what the ops take, since a custom op's arguments are tensors and scalars:

    step = torch.ops.pregate.plan_step(topk_ids, topk_w, handle)        # once per step
    y = torch.ops.pregate.moe_layer(x, topk_ids, topk_w, step, layer, handle)   # per MoE layer

Models whose every layer has its own gate (Mixtral, Qwen-MoE, OLMoE) know a layer's routes only
when the layer runs; their steps use three other ops:

    step = torch.ops.pregate.begin_step(x, handle)                       # once per step
    y = torch.ops.pregate.moe_layer_routed(x, topk_ids, topk_w, step, layer, handle)
    step = torch.ops.pregate.speculate(scores, step, layer, k, handle)   # optional, after a layer

`moe_layer_routed` loads any exact expert that is not resident; `speculate` takes predicted gate
scores `[D, T, E]` of the next D layers and loads the likely experts ahead of use. It returns the
step again, so that the next layer, which takes it, is ordered after the prefetch.

All ops are functional (nothing is mutated): `plan_step` returns a one-element int64 step tensor
that every `moe_layer` of the step takes, so a compiler neither drops the plan nor moves a layer
before it. Their fake implementations let `torch.compile` trace them without running them.
"""

# No `from __future__ import annotations`: custom_op reads the ops' annotations as types.
import ctypes
import itertools
import threading
import weakref

import torch

from . import _lib

_DTYPES = {torch.float32: _lib.F32, torch.bfloat16: _lib.BF16, torch.float16: _lib.F16}
_PROJ = {"gate": 0, "up": 1, "down": 2}

# Weak: a service dropped by its owner is freed; an op given its handle then fails clearly.
_services: "weakref.WeakValueDictionary[int, MoeService]" = weakref.WeakValueDictionary()
_services_lock = threading.Lock()
_handles = itertools.count(1)


def _stream(t: torch.Tensor) -> int:
    """The caller's stream for the ABI: torch's current stream on CUDA, 0 on the CPU."""
    if t.device.type == "cuda":
        return torch.cuda.current_stream(t.device).cuda_stream
    return 0


class MoeService:
    """The routed experts of every MoE layer of a model, in libpregate.so.

    Fill it with `set_expert` for every (layer, expert), then `finalize`. `cache_slots` = 0 keeps
    every expert resident; fewer slots than experts make the cache evict by `policy` (with the
    step's routes as Belady's next uses) and run a layer in waves when it needs more experts
    than it holds.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_experts: int,
        top_k: int,
        hidden: int,
        inter: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        cache_slots: int = 0,
        layer_quota: int = 0,
        policy: str = "belady",
        max_tokens: int = 0,
        shard_kind: int = 0,
        shard_rank: int = 0,
        shard_size: int = 1,
        seed: int = 0,
    ) -> None:
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype}: expected one of {list(_DTYPES)}")
        if policy not in _lib.POLICIES:
            raise ValueError(f"policy {policy!r}: expected one of {list(_lib.POLICIES)}")
        self.lib = _lib.load()
        self.device = torch.device(device)
        self.dtype = dtype
        self.hidden, self.inter, self.top_k = hidden, inter, top_k
        cfg = _lib.MoeConfig(
            struct_size=ctypes.sizeof(_lib.MoeConfig),
            num_layers=num_layers,
            num_experts=num_experts,
            top_k=top_k,
            hidden=hidden,
            inter=inter,
            dtype=_DTYPES[dtype],
            device=-1 if self.device.type == "cpu" else (self.device.index or 0),
            cache_slots=cache_slots,
            layer_quota=layer_quota,
            policy=_lib.POLICIES[policy],
            max_tokens=max_tokens,
            shard_kind=shard_kind,
            shard_rank=shard_rank,
            shard_size=shard_size,
            seed=seed,
        )
        ptr = ctypes.c_void_p()
        _lib.check(self.lib, self.lib.pregate_moe_create(ctypes.byref(cfg), ctypes.byref(ptr)))
        self._ptr: int | None = ptr.value
        self.slot_pool: torch.Tensor | None = None
        self.workspace: torch.Tensor | None = None
        with _services_lock:
            self.handle = next(_handles)
            _services[self.handle] = self

    def _check(self, status: int) -> None:
        _lib.check(self.lib, status)

    @property
    def ptr(self) -> int:
        """The native handle; raises once closed."""
        if self._ptr is None:
            raise _lib.PregateError("STATE", f"MoE service {self.handle} is closed")
        return self._ptr

    def set_expert(
        self, layer: int, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
    ) -> None:
        """Copies one expert (gate, up `[inter, hidden]`, down `[hidden, inter]`; f32, bf16 or
        f16, any device) into the library's store."""
        for name, w in (("gate", gate), ("up", up), ("down", down)):
            w = w.detach()
            if w.dtype not in _DTYPES:
                w = w.float()
            w = w.to("cpu")
            if w.dim() != 2 or w.stride(1) != 1:
                w = w.contiguous()
            rows, cols = w.shape if w.dim() == 2 else (0, 0)
            self._check(
                self.lib.pregate_moe_set_expert(
                    self.ptr,
                    layer,
                    expert,
                    _PROJ[name],
                    _DTYPES[w.dtype],
                    w.data_ptr(),
                    rows,
                    cols,
                    w.stride(0) if w.dim() == 2 else 0,
                )
            )

    def device_bytes(self) -> tuple[int, int]:
        """The device memory `finalize` hands the library: (slot pool, workspace) bytes; (0, 0)
        on the CPU."""
        pool, ws = ctypes.c_uint64(0), ctypes.c_uint64(0)
        self._check(
            self.lib.pregate_moe_device_bytes(self.ptr, ctypes.byref(pool), ctypes.byref(ws))
        )
        return pool.value, ws.value

    def finalize(self) -> None:
        """Checks that every expert is set and builds the runtime.

        On CUDA the slot pool and the workspace are torch tensors allocated here (so torch's
        allocator, and a host that sizes its memory from it such as vLLM, counts them); the
        library borrows them and this object keeps them alive as long as the service.
        """
        pool_bytes, ws_bytes = self.device_bytes()

        def region(n: int) -> torch.Tensor | None:
            return torch.empty(n, dtype=torch.uint8, device=self.device) if n else None

        self.slot_pool, self.workspace = region(pool_bytes), region(ws_bytes)
        self._check(
            self.lib.pregate_moe_finalize(
                self.ptr,
                None if self.slot_pool is None else self.slot_pool.data_ptr(),
                pool_bytes,
                None if self.workspace is None else self.workspace.data_ptr(),
                ws_bytes,
            )
        )

    def stats(self) -> dict[str, float]:
        """The service's counters (hits, misses, evictions, bytes_loaded, ...)."""
        st = _lib.MoeStats(struct_size=ctypes.sizeof(_lib.MoeStats))
        self._check(self.lib.pregate_moe_stats(self.ptr, ctypes.byref(st)))
        return {name: getattr(st, name) for name, _ in _lib.MoeStats._fields_[2:]}

    def metrics_text(self) -> str:
        """The counters in Prometheus' text format."""
        needed = ctypes.c_size_t(0)
        self._check(self.lib.pregate_moe_metrics_text(self.ptr, None, 0, ctypes.byref(needed)))
        buf = ctypes.create_string_buffer(needed.value)
        self._check(
            self.lib.pregate_moe_metrics_text(self.ptr, buf, needed.value, ctypes.byref(needed))
        )
        return buf.value.decode()

    def plan(self, topk_ids: torch.Tensor, topk_w: torch.Tensor) -> int:
        """Plans a step of `[T, k]` routes; returns the step id."""
        ids = topk_ids.detach().to("cpu", torch.int32).contiguous()
        w = topk_w.detach().to("cpu", torch.float32).contiguous()
        if ids.dim() != 2 or ids.shape != w.shape:
            raise ValueError(f"topk_ids {tuple(ids.shape)} and topk_w {tuple(w.shape)}: [T, k]")
        step = ctypes.c_uint64(0)
        self._check(
            self.lib.pregate_moe_plan_step(
                self.ptr,
                ids.data_ptr(),
                w.data_ptr(),
                ids.shape[0],
                ids.shape[1],
                _stream(topk_ids),
                ctypes.byref(step),
            )
        )
        return step.value

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, step: int, layer: int
    ) -> torch.Tensor:
        """The experts of `layer` for `x` (`[T, hidden]`) under the open step `step`."""
        x = self._check_x(x)
        on_host = x.device.type == "cpu"
        ids = topk_ids.detach().to(x.device if not on_host else "cpu", torch.int32).contiguous()
        w = topk_w.detach().to(ids.device, torch.float32).contiguous()
        out = torch.empty((x.shape[0], self.hidden), dtype=x.dtype, device=x.device)
        self._check(
            self.lib.pregate_moe_layer_forward(
                self.ptr,
                step,
                layer,
                x.data_ptr(),
                x.stride(0),
                ids.data_ptr(),
                w.data_ptr(),
                x.shape[0],
                out.data_ptr(),
                _stream(x),
            )
        )
        return out

    def configure_speculation(self, depth: int, extra: int = 1, max_loads: int = 0) -> None:
        """Speculative prefetch `depth` layers ahead (0: off) with `extra` candidates per token
        beyond the gating top-k, at most `max_loads` loads per `speculate` (0: no cap)."""
        self._check(self.lib.pregate_moe_configure_speculation(self.ptr, depth, extra, max_loads))

    def begin_step(self, num_tokens: int, like: torch.Tensor | None = None) -> int:
        """Opens a step of `num_tokens` tokens whose routes come per layer; returns its id."""
        step = ctypes.c_uint64(0)
        stream = 0 if like is None else _stream(like)
        self._check(
            self.lib.pregate_moe_begin_step(self.ptr, num_tokens, stream, ctypes.byref(step))
        )
        return step.value

    def forward_routed(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, step: int, layer: int
    ) -> torch.Tensor:
        """The experts of `layer` for `x` (`[T, hidden]`) with the layer's exact `[T, k]` routes,
        under the step `step` opened by `begin_step`."""
        x = self._check_x(x)
        ids = topk_ids.detach().to("cpu", torch.int32).contiguous()
        w = topk_w.detach().to("cpu", torch.float32).contiguous()
        if ids.dim() != 2 or ids.shape != w.shape or ids.shape[0] != x.shape[0]:
            raise ValueError(
                f"topk_ids {tuple(ids.shape)} and topk_w {tuple(w.shape)}: [T, k] with T = "
                f"{x.shape[0]}"
            )
        out = torch.empty((x.shape[0], self.hidden), dtype=x.dtype, device=x.device)
        self._check(
            self.lib.pregate_moe_layer_forward_routed(
                self.ptr,
                step,
                layer,
                x.data_ptr(),
                x.stride(0),
                ids.data_ptr(),
                w.data_ptr(),
                x.shape[0],
                ids.shape[1],
                out.data_ptr(),
                _stream(x),
            )
        )
        return out

    def speculate(self, scores: torch.Tensor, step: int, layer: int, top_k: int) -> int:
        """Hands predicted gate scores `[D, T, E]` of layers `layer + 1 .. layer + D` to the
        speculator; returns the loads issued ahead of use."""
        if scores.dim() != 3:
            raise ValueError(f"scores has shape {tuple(scores.shape)}; expected [D, T, E]")
        s = scores.detach().to("cpu", torch.float32).contiguous()
        queued = ctypes.c_uint32(0)
        self._check(
            self.lib.pregate_moe_speculate(
                self.ptr,
                step,
                layer,
                s.shape[0],
                s.data_ptr(),
                s.shape[1],
                top_k,
                _stream(scores),
                ctypes.byref(queued),
            )
        )
        return queued.value

    def speculation_stats(self) -> dict[str, object]:
        """Speculation counters: depth, per-distance `hits` and `misses` (lists by distance - 1),
        `recall` per distance (None before any observation), `loads`, `used`, `wasted`."""
        st = _lib.SpecStats(struct_size=ctypes.sizeof(_lib.SpecStats))
        self._check(self.lib.pregate_moe_speculation_stats(self.ptr, ctypes.byref(st)))
        hits, misses = list(st.hits), list(st.misses)
        recall = [h / (h + m) if h + m else None for h, m in zip(hits, misses, strict=True)]
        return {
            "depth": st.depth,
            "hits": hits[: st.depth],
            "misses": misses[: st.depth],
            "recall": recall[: st.depth],
            "loads": st.loads,
            "used": st.used,
            "wasted": st.wasted,
        }

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [T, {self.hidden}]")
        if x.dtype != self.dtype or x.device != self.device:
            raise ValueError(
                f"x is {x.dtype} on {x.device}; the service is {self.dtype} on {self.device}"
            )
        return x if x.stride(1) == 1 else x.contiguous()

    def end_step(self, step: int) -> None:
        """Ends the step (its experts are unpinned)."""
        self._check(self.lib.pregate_moe_step_end(self.ptr, step, 0))

    def close(self) -> None:
        """Destroys the native service (idempotent)."""
        with _services_lock:
            _services.pop(self.handle, None)
        if self._ptr is not None:
            self.lib.pregate_moe_destroy(self._ptr)
            self._ptr = None
        # Only now, with the library done with them, may torch reuse the regions.
        self.slot_pool = self.workspace = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass  # at interpreter exit the module's globals may already be gone


def service(handle: int) -> MoeService:
    """The live service of `handle`."""
    with _services_lock:
        s = _services.get(handle)
    if s is None:
        raise _lib.PregateError("STATE", f"no MoE service has handle {handle}")
    return s


@torch.library.custom_op("pregate::plan_step", mutates_args=())
def plan_step(topk_ids: torch.Tensor, topk_w: torch.Tensor, handle: int) -> torch.Tensor:
    """Plans a step of `[T, k]` routes (the same at every layer); returns the step as a
    one-element int64 tensor that each `moe_layer` of the step takes."""
    return torch.tensor([service(handle).plan(topk_ids, topk_w)], dtype=torch.int64)


@plan_step.register_fake
def _plan_step_fake(topk_ids: torch.Tensor, topk_w: torch.Tensor, handle: int) -> torch.Tensor:
    return torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("pregate::moe_layer", mutates_args=())
def moe_layer(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_w: torch.Tensor,
    step: torch.Tensor,
    layer: int,
    handle: int,
) -> torch.Tensor:
    """The routed experts of `layer` for `x` (`[T, hidden]`): `sum_j w_j FFN_{e_j}(x[t])`."""
    return service(handle).forward(x, topk_ids, topk_w, int(step[0]), layer)


@moe_layer.register_fake
def _moe_layer_fake(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_w: torch.Tensor,
    step: torch.Tensor,
    layer: int,
    handle: int,
) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("pregate::begin_step", mutates_args=())
def begin_step(x: torch.Tensor, handle: int) -> torch.Tensor:
    """Opens a step for the `x.shape[0]` tokens of `x`, whose routes come per layer; returns the
    step as a one-element int64 tensor that each `moe_layer_routed` of the step takes."""
    return torch.tensor([service(handle).begin_step(x.shape[0], x)], dtype=torch.int64)


@begin_step.register_fake
def _begin_step_fake(x: torch.Tensor, handle: int) -> torch.Tensor:
    return torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("pregate::moe_layer_routed", mutates_args=())
def moe_layer_routed(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_w: torch.Tensor,
    step: torch.Tensor,
    layer: int,
    handle: int,
) -> torch.Tensor:
    """The routed experts of `layer` for `x` (`[T, hidden]`) with the layer's exact routes;
    experts not resident are loaded first."""
    return service(handle).forward_routed(x, topk_ids, topk_w, int(step[0]), layer)


# Same arguments as `moe_layer`, and the same output: a tensor shaped like `x`.
moe_layer_routed.register_fake(_moe_layer_fake)


@torch.library.custom_op("pregate::speculate", mutates_args=())
def speculate(
    scores: torch.Tensor, step: torch.Tensor, layer: int, top_k: int, handle: int
) -> torch.Tensor:
    """Predicted gate scores `[D, T, E]` of layers `layer + 1 .. layer + D`, after `layer` ran:
    likely experts are loaded ahead of use. Returns the step again (a new tensor), which the next
    layer takes, so the prefetch is ordered before it."""
    service(handle).speculate(scores, int(step[0]), layer, top_k)
    return step.clone()


@speculate.register_fake
def _speculate_fake(
    scores: torch.Tensor, step: torch.Tensor, layer: int, top_k: int, handle: int
) -> torch.Tensor:
    return torch.empty_like(step)
