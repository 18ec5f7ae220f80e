import torch

from pregate_vllm.router import HostRouter, ReadMERouter, select_top_k


def test_torch_router_matches_the_library_router(tiny_h64):
    torch_router = ReadMERouter.from_model_dir(tiny_h64)
    host = HostRouter(tiny_h64)
    assert torch_router.dim // torch_router.n_head == 64
    g = torch.Generator().manual_seed(0)
    for length in (1, 17, 60):
        ids = torch.randint(0, 512, (length,), generator=g)
        e_t, w_t = torch_router.route(ids)
        e_h, w_h = host.route(ids.tolist())
        assert torch.equal(e_t, e_h), f"length {length}"
        torch.testing.assert_close(w_t, w_h, rtol=1e-5, atol=1e-5)
        # The library's router carries its KV state across calls: routing in chunks agrees.
        e_c, w_c = host.route(ids.tolist(), chunk=5)
        assert torch.equal(e_c, e_h)
    host.close()


def test_top_k_ties_go_to_the_lower_index():
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0]])
    e, w = select_top_k(logits, 1)
    assert e.tolist() == [[1]] and w.tolist() == [[1.0]]
    e, w = select_top_k(logits, 3)
    assert e.tolist() == [[1, 2, 0]]
    torch.testing.assert_close(w.sum(-1), torch.ones(1))
