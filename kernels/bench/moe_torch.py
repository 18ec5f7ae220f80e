"""PyTorch eager baseline of the expert layer, as the Read-ME code runs it: a Python loop over
experts, each gathering its tokens, running its SwiGLU FFN and scattering the weighted result.

Same shapes and routing distribution as `gpu expert-layer` (uniform random top-k), bf16, timed
with CUDA events (median). Prints `RESULT torch_expert_layer shape T ms`.
"""
import sys
import torch
import torch.nn.functional as F


def bench(fn, warm, reps):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main():
    quick = "--quick" in sys.argv
    ts = [1, 128, 2048] if quick else [1, 8, 32, 128, 512, 2048, 8192]
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    for name, h, i, e, k in [("readme", 4096, 5504, 7, 1), ("mixtral", 4096, 14336, 8, 2)]:
        gate = [torch.empty(i, h, device=dev, dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=g) for _ in range(e)]
        up = [torch.empty(i, h, device=dev, dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=g) for _ in range(e)]
        down = [torch.empty(h, i, device=dev, dtype=torch.bfloat16).uniform_(-0.02, 0.02, generator=g) for _ in range(e)]
        for t in ts:
            x = torch.empty(t, h, device=dev, dtype=torch.bfloat16).uniform_(-1, 1, generator=g)
            ids = torch.stack([torch.randperm(e, device=dev, generator=g)[:k] for _ in range(t)]) if t <= 2048 else \
                torch.rand(t, e, device=dev, generator=g).argsort(dim=1)[:, :k]
            w = torch.softmax(torch.rand(t, k, device=dev, generator=g), dim=1) if k > 1 else torch.ones(t, 1, device=dev)

            def layer():
                out = torch.zeros_like(x)
                for ex in range(e):
                    tok, slot = torch.where(ids == ex)
                    if tok.numel() == 0:
                        continue
                    xe = x[tok]
                    ye = F.linear(F.silu(F.linear(xe, gate[ex])) * F.linear(xe, up[ex]), down[ex])
                    out.index_add_(0, tok, (ye * w[tok, slot, None]).to(out.dtype))
                return out

            ms = bench(layer, 3, 10 if t >= 2048 else 30)
            print(f"RESULT torch_expert_layer {name} {t} {ms:.4f}", flush=True)


if __name__ == "__main__":
    main()
