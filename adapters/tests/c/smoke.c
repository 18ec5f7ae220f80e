/* Compiled against pregate.h and linked to libpregate.so by tests/c_program.rs: creates a CPU
 * service, sets the experts of one layer, runs the layer and checks one value against a hand
 * computation; then checks that a forward without a plan fails with PREGATE_STATE, and that a
 * step with per-layer routes (begin_step, layer_forward_routed) gives the same values. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "pregate.h"

#define H 4
#define I 2
#define E 2

static int fail(const char *what, pregate_status s) {
    char msg[512];
    pregate_last_error(msg, sizeof msg);
    fprintf(stderr, "%s: status %d: %s\n", what, (int)s, msg);
    return 1;
}

int main(void) {
    if (pregate_abi_version() != PREGATE_ABI_VERSION) {
        fprintf(stderr, "ABI %u, header %d\n", pregate_abi_version(), PREGATE_ABI_VERSION);
        return 1;
    }
    PregateMoeConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.struct_size = sizeof cfg;
    cfg.num_layers = 1;
    cfg.num_experts = E;
    cfg.top_k = 1;
    cfg.hidden = H;
    cfg.inter = I;
    cfg.dtype = PREGATE_F32;
    cfg.device = -1;
    cfg.policy = PREGATE_BELADY;
    PregateMoe *m = NULL;
    pregate_status s = pregate_moe_create(&cfg, &m);
    if (s) return fail("create", s);

    /* Expert e: gate and up all (e + 1) / 10, down all 0.5. */
    float gate[E][I * H], down[H * I];
    for (int e = 0; e < E; e++)
        for (int j = 0; j < I * H; j++) gate[e][j] = (float)(e + 1) / 10.0f;
    for (int j = 0; j < H * I; j++) down[j] = 0.5f;
    for (int e = 0; e < E; e++) {
        if ((s = pregate_moe_set_expert(m, 0, e, PREGATE_GATE, PREGATE_F32, gate[e], I, H, H))) return fail("gate", s);
        if ((s = pregate_moe_set_expert(m, 0, e, PREGATE_UP, PREGATE_F32, gate[e], I, H, H))) return fail("up", s);
        if ((s = pregate_moe_set_expert(m, 0, e, PREGATE_DOWN, PREGATE_F32, down, H, I, I))) return fail("down", s);
    }
    /* f32 experts in an f32 service: 4 bytes an element, before and after finalize on the CPU. */
    uint64_t held = 0, held_want = (uint64_t)E * 3 * H * I * 4;
    if ((s = pregate_moe_host_bytes(m, &held))) return fail("host_bytes", s);
    if (held != held_want) {
        fprintf(stderr, "host_bytes %llu, expected %llu\n", (unsigned long long)held,
                (unsigned long long)held_want);
        return 1;
    }
    if ((s = pregate_moe_finalize(m, NULL, 0, NULL, 0))) return fail("finalize", s);
    if ((s = pregate_moe_host_bytes(m, &held))) return fail("host_bytes", s);
    if (held != held_want) {
        fprintf(stderr, "host_bytes %llu after finalize, expected %llu\n",
                (unsigned long long)held, (unsigned long long)held_want);
        return 1;
    }

    float x[H] = {1.0f, 2.0f, 3.0f, 4.0f}, out[H];
    int32_t ids[1] = {1};
    float w[1] = {1.0f};
    s = pregate_moe_layer_forward(m, 1, 0, x, H, ids, w, 1, out, 0);
    if (s != PREGATE_STATE) {
        fprintf(stderr, "forward without a plan returned %d, expected PREGATE_STATE\n", (int)s);
        return 1;
    }
    uint64_t step = 0;
    if ((s = pregate_moe_plan_step(m, ids, w, 1, 1, 0, &step))) return fail("plan_step", s);
    if ((s = pregate_moe_layer_forward(m, step, 0, x, H, ids, w, 1, out, 0))) return fail("forward", s);
    if ((s = pregate_moe_step_end(m, step, 0))) return fail("step_end", s);

    /* Expert 1: g = u = 0.2 * (1 + 2 + 3 + 4) = 2; mid = silu(2) * 2; out = 0.5 * I * mid. */
    double g = 2.0, mid = g / (1.0 + exp(-g)) * g, want = 0.5 * I * mid;
    for (int j = 0; j < H; j++)
        if (fabs(out[j] - want) > 1e-5 * (1.0 + fabs(want))) {
            fprintf(stderr, "out[%d] = %f, expected %f\n", j, out[j], want);
            return 1;
        }

    PregateMoeStats st;
    memset(&st, 0, sizeof st);
    st.struct_size = sizeof st;
    if ((s = pregate_moe_stats(m, &st))) return fail("stats", s);
    if (st.layer_calls != 1) {
        fprintf(stderr, "layer_calls %llu\n", (unsigned long long)st.layer_calls);
        return 1;
    }
    /* The same layer in a step whose routes come per layer gives the same values. */
    float out2[H];
    if ((s = pregate_moe_begin_step(m, 1, 0, &step))) return fail("begin_step", s);
    if ((s = pregate_moe_layer_forward_routed(m, step, 0, x, H, ids, w, 1, 1, out2, 0)))
        return fail("layer_forward_routed", s);
    for (int j = 0; j < H; j++)
        if (out2[j] != out[j]) {
            fprintf(stderr, "routed out[%d] = %f, planned %f\n", j, out2[j], out[j]);
            return 1;
        }
    PregateMoeSpecStats sp;
    memset(&sp, 0, sizeof sp);
    sp.struct_size = sizeof sp;
    if (sizeof sp != 96) {
        fprintf(stderr, "sizeof(PregateMoeSpecStats) = %zu, expected 96\n", sizeof sp);
        return 1;
    }
    if ((s = pregate_moe_speculation_stats(m, &sp))) return fail("speculation_stats", s);
    if (sp.depth != 0) {
        fprintf(stderr, "speculation depth %u without configuring it\n", sp.depth);
        return 1;
    }
    pregate_moe_destroy(m);
    printf("ok: out[0] = %f\n", out[0]);
    return 0;
}
