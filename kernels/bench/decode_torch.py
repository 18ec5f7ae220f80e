"""PyTorch eager implementation of a Read-ME model's decode (the same checkpoint `gpu decode`
runs), for the end-to-end comparison: bf16 weights on the GPU, a contiguous KV cache,
`scaled_dot_product_attention`, and the experts as a Python loop over experts (the Read-ME code's
way). Routing: each sequence's token is given a uniformly random expert per step (the router is
0.4 % of a step; pregate runs the real router on the host, included in its figure).

usage: decode_torch.py MODEL_DIR BATCHES STEPS   ->   `RESULT torch_decode batch tokens_per_s step_ms`
"""
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

DT = {"BF16": (np.uint16, torch.bfloat16), "F16": (np.float16, torch.float16), "F32": (np.float32, torch.float32)}


def load(model_dir):
    files = [f for f in os.listdir(model_dir) if f.endswith(".safetensors")]
    out = {}
    for f in files:
        path = os.path.join(model_dir, f)
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        for name, info in header.items():
            if name == "__metadata__" or name.startswith("cluster_predictor"):
                continue
            s, e = info["data_offsets"]
            npdt, tdt = DT[info["dtype"]]
            arr = np.frombuffer(mm[8 + n + s: 8 + n + e], dtype=npdt).reshape(info["shape"])
            t = torch.from_numpy(arr.copy())
            if info["dtype"] == "BF16":
                t = t.view(torch.bfloat16)
            out[name] = t.to("cuda", torch.bfloat16)
    return out


def rope(x, pos, theta):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    ang = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    rot = torch.cat([-x2, x1], -1)
    return (x.float() * cos[:, None, None] + rot.float() * sin[:, None, None]).to(x.dtype) if x.dim() == 4 else None


def rms(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * w


def main():
    model_dir, batches, steps = sys.argv[1], [int(b) for b in sys.argv[2].split(",")], int(sys.argv[3])
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    t0 = time.time()
    W = load(model_dir)
    print(f"torch load: {time.time() - t0:.1f} s", flush=True)
    L, H, nh = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads") or nh
    d = H // nh
    E, eps, theta = cfg["N_cluster"], cfg["rms_norm_eps"], cfg.get("rope_theta", 10000.0)
    lm = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    g = torch.Generator(device="cuda").manual_seed(0)
    for B in batches:
        maxlen = 64 + steps + 8
        kc = [torch.zeros(B, nkv, maxlen, d, device="cuda", dtype=torch.bfloat16) for _ in range(L)]
        vc = [torch.zeros_like(kc[0]) for _ in range(L)]
        tok = torch.randint(3, cfg["vocab_size"], (B,), device="cuda", generator=g)
        start_pos = 32  # as if a 32-token prompt had been prefilled

        def step(tok, p):
            x = W["model.embed_tokens.weight"][tok]  # [B, H]
            pos = torch.full((B,), p, device="cuda")
            experts = torch.randint(0, E, (B,), device="cuda", generator=g)
            for l in range(L):
                pre = f"model.layers.{l}."
                hN = rms(x, W[pre + "input_layernorm.weight"], eps)
                q = F.linear(hN, W[pre + "self_attn.q_proj.weight"]).view(B, 1, nh, d)
                k = F.linear(hN, W[pre + "self_attn.k_proj.weight"]).view(B, 1, nkv, d)
                v = F.linear(hN, W[pre + "self_attn.v_proj.weight"]).view(B, nkv, 1, d)
                q, k = rope(q, pos, theta), rope(k, pos, theta)
                kc[l][:, :, p] = k[:, 0]
                vc[l][:, :, p] = v[:, :, 0]
                a = F.scaled_dot_product_attention(q.transpose(1, 2), kc[l][:, :, : p + 1], vc[l][:, :, : p + 1],
                                                   enable_gqa=nkv != nh)
                x = x + F.linear(a.transpose(1, 2).reshape(B, nh * d), W[pre + "self_attn.o_proj.weight"])
                hN = rms(x, W[pre + "post_attention_layernorm.weight"], eps)
                out = torch.zeros_like(x)
                for e in range(E):
                    idx = torch.where(experts == e)[0]
                    if idx.numel() == 0:
                        continue
                    xe = hN[idx]
                    m = f"{pre}moe."
                    ye = F.linear(F.silu(F.linear(xe, W[f"{m}gate_proj_{e}.weight"])) * F.linear(xe, W[f"{m}up_proj_{e}.weight"]),
                                  W[f"{m}down_proj_{e}.weight"])
                    out.index_add_(0, idx, ye)
                x = x + out
            logits = F.linear(rms(x, W["model.norm.weight"], eps), lm).float()
            return logits.argmax(-1)

        with torch.no_grad():
            p = start_pos
            for _ in range(3):
                tok = step(tok, p)
                p += 1
            torch.cuda.synchronize()
            t = time.time()
            for _ in range(steps):
                tok = step(tok, p)
                tok.cpu()  # the sampled tokens reach the host every step, as in a server
                p += 1
            secs = time.time() - t
        print(f"RESULT torch_decode {B} {B * steps / secs:.1f} {secs / steps * 1e3:.2f}", flush=True)
        del kc, vc


if __name__ == "__main__":
    main()
