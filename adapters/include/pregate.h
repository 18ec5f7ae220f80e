/*
 * pregate.h - the C ABI of libpregate.so (crate pregate-adapters).
 *
 * Two services for a host framework (vLLM) that keeps attention, the KV cache and the dense parts
 * of a Mixture-of-Experts model itself:
 *
 *   - the per-layer MoE service (pregate_moe_*): pregate keeps the routed experts, their cache and
 *     the plan of a step; the host calls it once per step (plan_step) and once per MoE layer
 *     (layer_forward);
 *   - the host Read-ME router (pregate_router_*), for parity tests and host-side scheduling.
 *
 * STATUS. Every function returning pregate_status returns 0 on success, else one of pregate's
 * error codes (the numbers of pregate::ErrorCode, stable):
 *   1 INVALID_ARGUMENT  bad argument, shape, dtype, expert, NULL pointer, struct_size
 *   2 NOT_FOUND         a named file does not exist (router model directory)
 *   3 UNAVAILABLE       out of capacity (memory, cache slots)
 *   4 STATE             a call in the wrong state: set_expert after finalize, plan_step before
 *                       finalize, layer_forward without a plan or for another step
 *   5 DEVICE            a GPU, driver, NVRTC or cuBLAS failure; a device the build cannot use
 *   6 MODEL_DATA        the model's own numbers are unusable
 *   7 IO                a file-system failure other than not-found
 *   8 INTERNAL          a broken invariant of pregate (a panic inside is reported as this)
 * The message of the last failure on the calling thread is read with pregate_last_error. Nothing
 * unwinds out of the library.
 *
 * VERSIONING. Check pregate_abi_version() == PREGATE_ABI_VERSION at load. Structs passed in start
 * with struct_size = sizeof(the struct as the caller compiled it); a smaller one is refused, a
 * larger one (a newer header) is accepted when the bytes this library does not know are zero.
 *
 * MEMORY. The expert store is the library's: set_expert copies (and converts) its source before
 * returning, so the source is borrowed for the call only. Activations, routes and outputs are
 * borrowed per call; the library keeps no pointer to them after the call returns (on CUDA, work
 * enqueued on the caller's stream reads them later, in stream order). The library never frees
 * memory it did not allocate. Handles are freed by their destroy / close / free function only.
 *
 * STREAMS (CUDA). `stream` is the caller's CUDA stream (torch: current_stream().cuda_stream), 0 on
 * the CPU. Compute of a call goes on it; loads go on the library's own copy stream, ordered against
 * the caller's stream with events; no call synchronises the host except where a miss must wait for
 * a slot still being read. The device's primary context (torch's) is used.
 *
 * THREADS. A MoE handle serialises its calls with an internal lock; use it from one thread (the
 * host's worker thread). A router handle is immutable once open and may be shared; a router state
 * belongs to one sequence and must not be used by two threads at once.
 *
 * THIS VERSION. The CPU service (device = -1) is complete and tested: f32 / bf16 / f16
 * activations, computed in f32, with an accounting expert cache (the decisions and counters a
 * device cache makes). The CUDA service (device >= 0; f32 or bf16) is built but NOT YET RUN ON A
 * GPU: it adopts a caller-owned slot pool (device_bytes gives its size; NULL makes the library
 * allocate its own) and allocates its small per-call workspace itself in finalize (device_bytes
 * reports a workspace of 0; pass NULL), needs x in contiguous rows, and uses the plan's routes (topk_ids / topk_w are not
 * read). Without a CUDA driver or device, create fails with DEVICE.
 */
#ifndef PREGATE_H
#define PREGATE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PREGATE_ABI_VERSION 1

typedef int32_t pregate_status;

enum {
    PREGATE_OK = 0,
    PREGATE_INVALID_ARGUMENT = 1,
    PREGATE_NOT_FOUND = 2,
    PREGATE_UNAVAILABLE = 3,
    PREGATE_STATE = 4,
    PREGATE_DEVICE = 5,
    PREGATE_MODEL_DATA = 6,
    PREGATE_IO = 7,
    PREGATE_INTERNAL = 8
};

/* Element types. */
enum { PREGATE_F32 = 0, PREGATE_BF16 = 1, PREGATE_F16 = 2 };
/* The projections of an expert: gate and up are [inter, hidden], down is [hidden, inter]. */
enum { PREGATE_GATE = 0, PREGATE_UP = 1, PREGATE_DOWN = 2 };
/* Eviction policies of the expert cache. */
enum {
    PREGATE_LRU = 0,
    PREGATE_LFU = 1,
    PREGATE_RANDOM = 2,
    PREGATE_BELADY = 3,
    /* Belady on known next uses, then decayed use counts (rather than recency) for the rest. */
    PREGATE_BELADY_DECAY = 4
};
/* How this rank's experts are sharded: none, or tensor parallel (each rank holds a slice of
 * every expert's intermediate channels: `inter` is the slice; layer_forward returns a partial
 * sum the caller all-reduces). Expert parallel (2) is not supported yet. */
enum { PREGATE_SHARD_NONE = 0, PREGATE_SHARD_TP = 1 };

uint32_t pregate_abi_version(void);

/* Copies the calling thread's last error message into buf (at most cap - 1 bytes and a NUL) and
 * returns its full length; buf may be NULL with cap 0. */
size_t pregate_last_error(char *buf, size_t cap);

/* ------------------------------------------------------------------ MoE service */

typedef struct PregateMoe PregateMoe; /* opaque */

typedef struct {
    uint32_t struct_size;  /* sizeof(PregateMoeConfig) */
    uint32_t num_layers;   /* MoE layers */
    uint32_t num_experts;  /* routed experts per layer (at most 256) */
    uint32_t top_k;        /* most experts per token (at most 8) */
    uint32_t hidden;       /* model width H */
    uint32_t inter;        /* expert width I: this rank's slice under PREGATE_SHARD_TP */
    int32_t dtype;         /* activations' element type: PREGATE_F32 / _BF16 / _F16 */
    int32_t device;        /* -1: CPU; else the CUDA ordinal (torch's current device) */
    uint64_t cache_slots;  /* expert slots in all; 0: every expert resident */
    uint32_t layer_quota;  /* slots per layer (cache_slots 0 or num_layers * quota); 0: shared pool */
    int32_t policy;        /* PREGATE_LRU / _LFU / _RANDOM / _BELADY / _BELADY_DECAY */
    uint32_t max_tokens;   /* most tokens of a step (vLLM's max_num_batched_tokens); 0: no limit */
    uint32_t shard_kind;   /* PREGATE_SHARD_NONE / _TP */
    uint32_t shard_rank;
    uint32_t shard_size;
    uint64_t seed;         /* of the random policy (the CPU cache uses a fixed seed) */
} PregateMoeConfig;        /* 72 bytes */

typedef struct {
    uint32_t struct_size;  /* set to sizeof(PregateMoeStats) before the call; the library writes its own */
    uint32_t reserved;
    uint64_t hits;         /* cache accesses that found their expert resident */
    uint64_t misses;       /* cache accesses that loaded their expert */
    uint64_t evictions;
    uint64_t bytes_loaded; /* bytes copied into expert slots */
    uint64_t prefetches;   /* loads issued ahead of use by a plan */
    uint64_t layer_calls;
    uint64_t waves;        /* more than one per layer call when a layer's experts exceed its slots */
    double stall_s;        /* seconds compute waited for loads (CUDA) */
} PregateMoeStats;         /* 72 bytes */

/* Creates a service; *out is NULL on failure. With every expert resident (cache_slots 0) the
 * CPU service keeps no cache and its hit / miss counters stay 0. */
pregate_status pregate_moe_create(const PregateMoeConfig *cfg, PregateMoe **out);

/* Copies one projection of one expert into the library's store before returning, in the service's
 * dtype: bits copied when src_dtype is that dtype, else converted once (rounding to nearest; a
 * value the service's dtype cannot hold is INVALID_ARGUMENT, as a NaN or infinity is). host_src
 * holds `rows` rows `row_stride` elements apart; (rows, cols) must be [inter, hidden] for gate and
 * up, [hidden, inter] for down. Setting one twice replaces it. After finalize: STATE. */
pregate_status pregate_moe_set_expert(PregateMoe *m, uint32_t layer, uint32_t expert, int32_t proj,
                                      int32_t src_dtype, const void *host_src, uint64_t rows,
                                      uint64_t cols, uint64_t row_stride);

/* Device bytes the caller allocates for finalize (slot pool, workspace): 0 and 0 on the CPU. On
 * CUDA: the expert slot pool (cache_slots, or every expert, times an aligned expert size) and a
 * workspace of 0 (the library allocates its per-call workspace in finalize). */
pregate_status pregate_moe_device_bytes(const PregateMoe *m, uint64_t *slot_pool,
                                        uint64_t *workspace);

/* Checks that every (layer, expert, proj) was set (INVALID_ARGUMENT names the first missing one,
 * and the store is kept for more set_expert calls) and builds the runtime. CPU: slot_pool and
 * workspace are NULL. CUDA: slot_pool is caller-owned device memory (256-byte aligned) of
 * at least the size device_bytes gave, alive and untouched until destroy, and never freed by the
 * library; NULL lets the library allocate the pool. workspace is NULL with 0 bytes. */
pregate_status pregate_moe_finalize(PregateMoe *m, void *slot_pool, uint64_t slot_pool_bytes,
                                    void *workspace, uint64_t workspace_bytes);

/* Plans a step: num_tokens routes of top_k experts each (host memory, row-major [T, top_k];
 * top_k at most the service's), the same at every layer (Read-ME). Sets the cache's next uses
 * (Belady) for the step; a step still open is ended first. *step_id receives the step's id, which
 * every layer_forward and step_end of the step passes back. */
pregate_status pregate_moe_plan_step(PregateMoe *m, const int32_t *topk_ids_host,
                                     const float *topk_w_host, uint64_t num_tokens, uint32_t top_k,
                                     uint64_t stream, uint64_t *step_id);

/* The experts of `layer` for the step: out[t] = sum_j w_j * FFN_{e_j}(x[t]) over num_tokens rows
 * (num_tokens must be the plan's). x: num_tokens rows of `hidden` elements of the service's dtype,
 * x_row_stride elements apart; out: [num_tokens, hidden] contiguous, overwritten. CPU: host
 * pointers; topk_ids / topk_w ([num_tokens, top_k] as planned) are read. CUDA: device pointers,
 * work enqueued on `stream`. Without a plan, or for a step other than the open one: STATE. */
pregate_status pregate_moe_layer_forward(PregateMoe *m, uint64_t step_id, uint32_t layer,
                                         const void *x, uint64_t x_row_stride,
                                         const int32_t *topk_ids, const float *topk_w,
                                         uint64_t num_tokens, void *out, uint64_t stream);

/* Ends the open step (its experts are unpinned). Another step id: STATE. */
pregate_status pregate_moe_step_end(PregateMoe *m, uint64_t step_id, uint64_t stream);

/* Counters since create. */
pregate_status pregate_moe_stats(const PregateMoe *m, PregateMoeStats *out);

/* Host bytes the service holds for its experts: while loading, the projections set so far in the
 * service's dtype (2 bytes per bf16 / f16 element, 4 per f32); once finalized on the CPU, the f32
 * experts it computes with; on CUDA, the page-locked copy that feeds a cache smaller than the
 * experts (0 when every expert lives in a device slot). Each expert is packed from the store into
 * that copy and freed, so the host never holds the experts twice. */
pregate_status pregate_moe_host_bytes(const PregateMoe *m, uint64_t *out);

/* The counters in Prometheus' text format (pregate_moe_*, pregate_moe_host_expert_bytes as
 * pregate_moe_host_bytes gives it, and with speculation on
 * pregate_prediction_{hits,misses}_total and pregate_prediction_recall by distance and
 * pregate_speculative_{loads,used_loads,wasted_loads}_total), NUL-terminated. *needed receives the
 * text's bytes plus the NUL; buf is written only when cap >= *needed (call again with a larger
 * buffer otherwise). */
pregate_status pregate_moe_metrics_text(const PregateMoe *m, char *buf, size_t cap, size_t *needed);

/* ---- models that route per layer (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): a layer's routes are
 * known only when the layer runs. Per step: begin_step -> per MoE layer layer_forward_routed
 * (exact routes; an expert not resident is loaded then), and optionally, after a layer, speculate
 * (predicted gate scores of the next layers: candidates not resident are loaded ahead of use) ->
 * step_end (or the next begin_step / plan_step). Speculation never changes outputs. */

typedef struct {
    uint32_t struct_size;  /* set to sizeof(PregateMoeSpecStats) before the call */
    uint32_t depth;        /* configured depth; 0: speculation off (every counter 0) */
    uint64_t hits[4];      /* by distance - 1: exact experts predicted that many layers ahead */
    uint64_t misses[4];    /* exact experts not predicted that many layers ahead */
    uint64_t loads;        /* speculative loads issued */
    uint64_t used;         /* speculative loads their layer used */
    uint64_t wasted;       /* speculative loads evicted before any use */
} PregateMoeSpecStats;     /* 96 bytes */

/* Speculation on (depth 1..4 layers ahead; extra 0..8 candidates per token beyond the gating
 * top-k; at most max_loads loads per speculate call, 0: no cap but the cache) or off (depth 0).
 * Resets its counters. Inside a per-layer step: STATE. */
pregate_status pregate_moe_configure_speculation(PregateMoe *m, uint32_t depth, uint32_t extra,
                                                 uint32_t max_loads);

/* Opens a step of num_tokens tokens whose routes come per layer (a step still open is ended first;
 * earlier plans' next uses are dropped). *step_id receives its id. */
pregate_status pregate_moe_begin_step(PregateMoe *m, uint64_t num_tokens, uint64_t stream,
                                      uint64_t *step_id);

/* The experts of `layer` for a step opened by begin_step, with the layer's exact routes
 * (topk_ids_host / topk_w_host: HOST memory, [num_tokens, top_k] row-major, top_k at most the
 * service's): out[t] = sum_j w_j * FFN_{e_j}(x[t]). Experts not resident are loaded first. x, out
 * and stream as for layer_forward (host pointers on the CPU, device pointers on CUDA). A step
 * opened by plan_step, another step, or no step: STATE. */
pregate_status pregate_moe_layer_forward_routed(PregateMoe *m, uint64_t step_id, uint32_t layer,
                                                const void *x, uint64_t x_row_stride,
                                                const int32_t *topk_ids_host,
                                                const float *topk_w_host, uint64_t num_tokens,
                                                uint32_t top_k, void *out, uint64_t stream);

/* After `layer` ran in the step begun as step_id: predicted gate scores (f32, higher is likelier;
 * probabilities or logits) of layers layer+1 .. layer+depth for the step's tokens, host memory
 * [depth, num_tokens, num_experts] row-major; top_k is those layers' gating top-k. Each token's
 * top (top_k + extra) experts become candidates, nearest layer first, then by score; those not
 * resident, at most max_loads, are loaded ahead of use (CUDA: on the copy stream). *queued
 * receives the loads issued. depth must be 1..configured and layer+depth < num_layers; without
 * speculation configured: STATE. */
pregate_status pregate_moe_speculate(PregateMoe *m, uint64_t step_id, uint32_t layer,
                                     uint32_t depth, const float *scores_host,
                                     uint64_t num_tokens, uint32_t top_k, uint64_t stream,
                                     uint32_t *queued);

/* Speculation counters since it was configured. */
pregate_status pregate_moe_speculation_stats(const PregateMoe *m, PregateMoeSpecStats *out);

/* Destroys a handle (NULL: nothing). */
void pregate_moe_destroy(PregateMoe *m);

/* ------------------------------------------------------------------ host router */

typedef struct PregateRouter PregateRouter;           /* opaque */
typedef struct PregateRouterState PregateRouterState; /* opaque: one sequence's router KV */

/* Opens the Read-ME router (cluster_predictor) of a pregate model directory. */
pregate_status pregate_router_open(const char *model_dir, PregateRouter **out);
/* Experts per layer and experts per token. */
pregate_status pregate_router_shape(const PregateRouter *r, uint32_t *num_experts, uint32_t *top_k);
/* A state for one sequence (max_len: a reservation, not a limit). */
pregate_status pregate_router_state_new(const PregateRouter *r, uint32_t max_len,
                                        PregateRouterState **out);
/* Routes n tokens following those already in s: experts_out and weights_out receive n * top_k
 * values, each token's experts most heavily weighted first. On error s has not advanced. */
pregate_status pregate_router_route(const PregateRouter *r, PregateRouterState *s,
                                    const uint32_t *ids, uint64_t n, int32_t *experts_out,
                                    float *weights_out);
void pregate_router_state_free(PregateRouterState *s);
void pregate_router_close(PregateRouter *r);

#ifdef __cplusplus
}
#endif

#endif /* PREGATE_H */
