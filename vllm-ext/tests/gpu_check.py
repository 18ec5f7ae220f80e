"""The device checks of pregate_vllm's ops (no vLLM, no pytest needed), for Read-ME steps (one
plan for every layer) and for per-layer steps with speculative prefetch (Mixtral, Qwen-MoE,
OLMoE): run by `vllm-ext/gpu-check.sh` on a GPU host, and rehearsed on the CPU (the CUDA checks
then SKIP).

Each check prints one `RESULT <json>` line (name, status PASS / FAIL / SKIP, note, numbers);
the exit status is 0 when none failed.

    PREGATE_LIB=.../libpregate.so PYTHONPATH=<folder holding pregate_vllm> python3 gpu_check.py
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Callable

import torch

import pregate_vllm.ops  # noqa: F401  (registers torch.ops.pregate)
from pregate_vllm.ops import MoeService

LAYERS, EXPERTS, TOP_K, HIDDEN, INTER = 4, 8, 2, 256, 512
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2}

results: list[dict] = []


def check(name: str, needs_cuda: bool = False) -> Callable:
    """Runs the decorated check at once and records its outcome."""

    def run(fn: Callable[[], dict | None]) -> Callable:
        if needs_cuda and not torch.cuda.is_available():
            rec = {"name": name, "status": "SKIP", "note": "no CUDA device (torch sees none)"}
        else:
            t0 = time.perf_counter()
            try:
                rec = {"name": name, "status": "PASS", **(fn() or {})}
            except Exception as e:  # noqa: BLE001 (a failed check is reported, the rest still run)
                rec = {"name": name, "status": "FAIL", "note": f"{type(e).__name__}: {e}"}
                traceback.print_exc()
            rec["seconds"] = round(time.perf_counter() - t0, 3)
        results.append(rec)
        print("RESULT " + json.dumps(rec), flush=True)
        return fn

    return run


def weights(dtype: torch.dtype, seed: int = 7) -> list[list[tuple[torch.Tensor, ...]]]:
    g = torch.Generator().manual_seed(seed)

    def m(r: int, c: int) -> torch.Tensor:
        return (torch.randn(r, c, generator=g) / c**0.5).to(dtype)

    return [
        [(m(INTER, HIDDEN), m(INTER, HIDDEN), m(HIDDEN, INTER)) for _ in range(EXPERTS)]
        for _ in range(LAYERS)
    ]


def service(
    ws: list, dtype: torch.dtype, device: str, slots: int = 0, policy: str = "belady"
) -> MoeService:
    svc = MoeService(
        num_layers=LAYERS,
        num_experts=EXPERTS,
        top_k=TOP_K,
        hidden=HIDDEN,
        inter=INTER,
        dtype=dtype,
        device=device,
        cache_slots=slots,
        policy=policy,
        max_tokens=256,
    )
    for layer, experts in enumerate(ws):
        for e, (gate, up, down) in enumerate(experts):
            svc.set_expert(layer, e, gate, up, down)
    svc.finalize()
    return svc


def routes(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOP_K] for _ in range(tokens)])
    return ids.to(torch.int32), torch.softmax(torch.randn(tokens, TOP_K, generator=g), dim=-1)


def reference(
    ws: list, layer: int, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """The dense reference on the CPU in f64: sum_j w_j down(silu(gate x) * up x)."""
    x = x.double().cpu()
    out = torch.zeros_like(x)
    for e in range(EXPERTS):
        hit = ids.cpu() == e
        rows = hit.any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        gate, up, down = (t.double() for t in ws[layer][e])
        xe = x[rows]
        y = (torch.nn.functional.silu(xe @ gate.T) * (xe @ up.T)) @ down.T
        out[rows] += (w.double().cpu()[rows] * hit[rows]).sum(dim=1, keepdim=True) * y
    return out


def compare(
    dtype: torch.dtype, device: str, slots: int, stream: torch.cuda.Stream | None = None
) -> dict:
    """Three steps of every layer through the ops against the reference; returns the worst error."""
    ws = weights(dtype)
    svc = service(ws, dtype, device, slots)
    g = torch.Generator().manual_seed(3)
    worst = 0.0
    for s in range(3):
        ids, w = routes(33, seed=s)
        x = torch.randn(33, HIDDEN, generator=g).to(dtype)
        ctx = torch.cuda.stream(stream) if stream is not None else _null()
        with ctx:
            xd, idsd, wd = x.to(device), ids.to(device), w.to(device)
            if stream is not None:
                # A long matmul ahead on the same stream: a library that computes on another
                # stream (its own, or the legacy default) reads x before it is written.
                big = torch.randn(8192, 8192, device=device)
                for _ in range(4):
                    big = big @ big
                    big = big / big.norm()
                xd = xd + big[:1, :1].to(dtype) * 0
            step = torch.ops.pregate.plan_step(idsd, wd, svc.handle)
            outs = [
                torch.ops.pregate.moe_layer(xd, idsd, wd, step, layer, svc.handle)
                for layer in range(LAYERS)
            ]
        if device != "cpu":
            torch.cuda.synchronize()
        for layer, y in enumerate(outs):
            want = reference(ws, layer, x, ids, w)
            err = ((y.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-9)).item()
            worst = max(worst, err)
        svc.end_step(int(step[0]))
    st = svc.stats()
    svc.close()
    if worst > TOL[dtype]:
        raise AssertionError(f"relative error {worst:.3g} above {TOL[dtype]}")
    if slots and slots < LAYERS * EXPERTS and st["misses"] == 0:
        raise AssertionError(f"{slots} slots for {LAYERS * EXPERTS} experts and no miss: {st}")
    return {"note": f"max rel err {worst:.3g}", "stats": st}


def compare_routed(dtype: torch.dtype, device: str, slots: int, depth: int) -> dict:
    """Per-layer steps (each layer its own routes, as Mixtral or Qwen-MoE route) through
    `begin_step` / `moe_layer_routed`, with speculation `depth` layers ahead fed noisy copies of
    the next layers' true gate scores, against the reference; returns the worst error and the
    counters."""
    ws = weights(dtype)
    svc = service(ws, dtype, device, slots)
    if depth:
        svc.configure_speculation(depth, extra=1)
    g = torch.Generator().manual_seed(4)
    worst = 0.0
    for s in range(3):
        x = torch.randn(17, HIDDEN, generator=g).to(dtype)
        layer_routes = [routes(17, seed=100 * s + layer) for layer in range(LAYERS)]
        xd = x.to(device)
        step = torch.ops.pregate.begin_step(xd, svc.handle)
        outs = []
        for layer in range(LAYERS):
            ids, w = layer_routes[layer]
            outs.append(
                torch.ops.pregate.moe_layer_routed(
                    xd, ids.to(device), w.to(device), step, layer, svc.handle
                )
            )
            d = min(depth, LAYERS - 1 - layer)
            if d:
                # The true next routes as scores, plus noise: a predictor that is mostly right.
                scores = torch.rand(d, 17, EXPERTS, generator=g) * 0.5
                for j in range(d):
                    scores[j].scatter_(1, layer_routes[layer + 1 + j][0].long(), 1.0)
                step = torch.ops.pregate.speculate(
                    scores.to(device), step, layer, TOP_K, svc.handle
                )
        if device != "cpu":
            torch.cuda.synchronize()
        for layer, y in enumerate(outs):
            ids, w = layer_routes[layer]
            want = reference(ws, layer, x, ids, w)
            err = ((y.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-9)).item()
            worst = max(worst, err)
    st, sp = svc.stats(), svc.speculation_stats()
    svc.close()
    if worst > TOL[dtype]:
        raise AssertionError(f"relative error {worst:.3g} above {TOL[dtype]}")
    if depth and slots and sp["loads"] == 0:
        raise AssertionError(f"speculation {depth} ahead with {slots} slots loaded nothing: {sp}")
    if depth and sp["recall"] and sp["recall"][0] != 1.0:
        raise AssertionError(f"the true routes were predicted, yet recall is {sp['recall']}")
    return {"note": f"max rel err {worst:.3g}, {sp['loads']} speculative loads", "stats": st}


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None


def main() -> int:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if dev == "cuda" else "cpu"
    print(f"# torch {torch.__version__}, device {name}")

    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        check(f"cpu {name} all resident")(lambda d=dtype: compare(d, "cpu", 0))
        check(f"cpu {name} 5 slots")(lambda d=dtype: compare(d, "cpu", 5))
        check(f"cuda {name} all resident", True)(lambda d=dtype: compare(d, "cuda", 0))
        check(f"cuda {name} 5 slots", True)(lambda d=dtype: compare(d, "cuda", 5))

    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        check(f"cpu {name} per-layer routes, 12 slots, speculation 2 ahead")(
            lambda d=dtype: compare_routed(d, "cpu", 12, 2)
        )
        check(f"cuda {name} per-layer routes, all resident", True)(
            lambda d=dtype: compare_routed(d, "cuda", 0, 0)
        )
        check(f"cuda {name} per-layer routes, 12 slots, speculation 2 ahead", True)(
            lambda d=dtype: compare_routed(d, "cuda", 12, 2)
        )

    @check("cuda non-default stream behind a long matmul", True)
    def _() -> dict:
        return compare(torch.float32, "cuda", 5, stream=torch.cuda.Stream())

    @check("cuda slot pool in torch's allocator", True)
    def _() -> dict:
        ws = weights(torch.bfloat16)
        before = torch.cuda.memory_allocated()
        svc = service(ws, torch.bfloat16, "cuda", slots=6)
        grown = torch.cuda.memory_allocated() - before
        pool, workspace = svc.device_bytes()
        svc.close()
        if pool == 0 or grown < pool:
            raise AssertionError(f"pool {pool} bytes, torch's allocator grew by {grown}")
        return {
            "note": f"pool {pool} B, allocator +{grown} B",
            "pool": pool,
            "workspace": workspace,
        }

    def overhead(device: str) -> dict:
        ws = weights(torch.bfloat16 if device == "cuda" else torch.float32)
        dtype = ws[0][0][0].dtype
        svc = service(ws, dtype, device)
        ids, w = routes(1, seed=1)
        ids, w = ids.to(device), w.to(device)
        x = torch.randn(1, HIDDEN).to(dtype).to(device)

        def one_step() -> None:
            step = torch.ops.pregate.plan_step(ids, w, svc.handle)
            for layer in range(LAYERS):
                torch.ops.pregate.moe_layer(x, ids, w, step, layer, svc.handle)

        for _ in range(5):
            one_step()
        n = 50
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            one_step()
        if device == "cuda":
            torch.cuda.synchronize()
        per_layer = (time.perf_counter() - t0) / (n * LAYERS) * 1e6
        svc.close()
        return {"note": f"{per_layer:.1f} us per layer (plan included)", "us_per_layer": per_layer}

    check("cpu per-call overhead, one token")(lambda: overhead("cpu"))
    check("cuda per-call overhead, one token", True)(lambda: overhead("cuda"))

    @check("cuda prefetch overlap", True)
    def _() -> dict:
        # 4 layers x 8 experts in 8 slots: every step loads most of its experts. Behind a plan the
        # loads run on the copy stream while the host waits; right after one they stall compute.
        ws = weights(torch.bfloat16)
        svc = service(ws, torch.bfloat16, "cuda", slots=8)
        x = torch.randn(64, HIDDEN).to(torch.bfloat16).cuda()

        def step_time(seed: int, head_start: float) -> float:
            ids, w = routes(64, seed)
            ids, w = ids.cuda(), w.cuda()
            torch.cuda.synchronize()
            step = torch.ops.pregate.plan_step(ids, w, svc.handle)
            time.sleep(head_start)  # the plan's loads proceed on the copy stream meanwhile
            t0 = time.perf_counter()
            for layer in range(LAYERS):
                torch.ops.pregate.moe_layer(x, ids, w, step, layer, svc.handle)
            torch.cuda.synchronize()
            svc.end_step(int(step[0]))
            return time.perf_counter() - t0

        cold = [step_time(s, 0.0) for s in range(10, 20)]
        warm = [step_time(s, 0.05) for s in range(20, 30)]
        stats = svc.stats()
        svc.close()
        c, w_ = sorted(cold)[5] * 1e3, sorted(warm)[5] * 1e3
        return {
            "note": f"layers after plan: {c:.3f} ms at once, {w_:.3f} ms after 50 ms "
            f"(stall {c - w_:.3f} ms)",
            "ms_no_head_start": c,
            "ms_head_start": w_,
            "stats": stats,
        }

    @check("cuda speculative prefetch overlap with compute", True)
    def _() -> dict:
        # 4 layers x 8 experts in 12 slots, one token of top-2 per layer: a layer's two experts
        # are usually not resident. Between layers a matmul stands in for attention. With
        # speculation the next layer's experts (predicted exactly) load on the copy stream
        # during that matmul; without it they load on demand when the layer runs.
        ws = weights(torch.bfloat16)
        x = torch.randn(1, HIDDEN).to(torch.bfloat16).cuda()
        filler = torch.randn(2048, 2048, device="cuda")

        def run(depth: int) -> tuple[float, dict]:
            svc = service(ws, torch.bfloat16, "cuda", slots=12)
            if depth:
                svc.configure_speculation(depth, extra=0)
            times = []
            for s in range(12):
                rs = [routes(1, seed=1000 * s + layer) for layer in range(LAYERS)]
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                step = torch.ops.pregate.begin_step(x, svc.handle)
                for layer in range(LAYERS):
                    ids, w = rs[layer]
                    torch.ops.pregate.moe_layer_routed(
                        x, ids.cuda(), w.cuda(), step, layer, svc.handle
                    )
                    if depth and layer + 1 < LAYERS:
                        scores = torch.zeros(1, 1, EXPERTS)
                        scores[0].scatter_(1, rs[layer + 1][0].long(), 1.0)
                        step = torch.ops.pregate.speculate(
                            scores.cuda(), step, layer, TOP_K, svc.handle
                        )
                    f = filler
                    for _ in range(3):
                        f = f @ filler
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                svc.end_step(int(step[0]))
            st = {**svc.stats(), "speculation": svc.speculation_stats()}
            svc.close()
            return sorted(times[2:])[len(times[2:]) // 2] * 1e3, st

        off, st_off = run(0)
        on, st_on = run(1)
        return {
            "note": f"step {off:.3f} ms on demand, {on:.3f} ms with speculation 1 ahead "
            f"({st_on['prefetches']} prefetches, misses {st_off['misses']} -> {st_on['misses']})",
            "ms_on_demand": off,
            "ms_speculative": on,
            "stats_on_demand": st_off,
            "stats_speculative": st_on,
        }

    failed = [r["name"] for r in results if r["status"] == "FAIL"]
    counts = {s: sum(r["status"] == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    print(f"# {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")
    if failed:
        print("# failed: " + ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
