//! The host Read-ME router (`pregate_router_*`): the library's own router, for parity tests of
//! another implementation (the torch router of `pregate_vllm`) and for schedulers that route
//! prompts on the host.

use std::ffi::{c_char, CStr};
use std::path::Path;
use std::sync::Mutex;

use pregate::model::weights::RouterWeights;
use pregate::model::ModelDir;
use pregate::router::{ReadMeRouter, RouterState};

use crate::ffi::{self, guard, CallResult, Failure, Status};

/// An opaque router handle (`PregateRouter *`): immutable once open, so it may be shared by
/// threads, each routing with its own state.
pub struct PregateRouter(ReadMeRouter);

/// One sequence's router state (`PregateRouterState *`): the router's KV cache of the tokens
/// routed so far.
pub struct PregateRouterState(Mutex<RouterState>);

/// Opens the Read-ME router of the model directory `model_dir` (a NUL-terminated UTF-8 path).
///
/// # Safety
/// `model_dir` must be a NUL-terminated string; `out` a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn pregate_router_open(
    model_dir: *const c_char,
    out: *mut *mut PregateRouter,
) -> Status {
    guard("pregate_router_open", || {
        // SAFETY: the caller's contract.
        let out = unsafe { ffi::non_null_mut(out, "out")? };
        *out = std::ptr::null_mut();
        if model_dir.is_null() {
            return Err(Failure::invalid("`model_dir` is NULL"));
        }
        // SAFETY: non-null, NUL-terminated (the caller's contract).
        let dir = unsafe { CStr::from_ptr(model_dir) }
            .to_str()
            .map_err(|_| Failure::invalid("`model_dir` is not UTF-8"))?;
        let model = ModelDir::open(Path::new(dir))?;
        let weights = RouterWeights::load(&model.checkpoint, &model.config)?;
        let router = ReadMeRouter::new(weights, &model.config);
        *out = Box::into_raw(Box::new(PregateRouter(router)));
        Ok(())
    })
}

/// The router's experts per layer and experts per token.
///
/// # Safety
/// `r` must be a live router; `num_experts` and `top_k` writable.
#[no_mangle]
pub unsafe extern "C" fn pregate_router_shape(
    r: *const PregateRouter,
    num_experts: *mut u32,
    top_k: *mut u32,
) -> Status {
    guard("pregate_router_shape", || {
        // SAFETY: the caller's contract.
        let (r, n, k) = unsafe {
            (
                ffi::non_null(r, "r")?,
                ffi::non_null_mut(num_experts, "num_experts")?,
                ffi::non_null_mut(top_k, "top_k")?,
            )
        };
        *n = r.0.num_experts() as u32;
        *k = r.0.top_k() as u32;
        Ok(())
    })
}

/// A fresh state for one sequence of up to `max_len` tokens (a reservation, not a limit).
///
/// # Safety
/// `r` must be a live router; `out` a writable pointer.
#[no_mangle]
pub unsafe extern "C" fn pregate_router_state_new(
    r: *const PregateRouter,
    max_len: u32,
    out: *mut *mut PregateRouterState,
) -> Status {
    guard("pregate_router_state_new", || {
        // SAFETY: the caller's contract.
        let (r, out) = unsafe { (ffi::non_null(r, "r")?, ffi::non_null_mut(out, "out")?) };
        let state = r.0.new_state(max_len as usize);
        *out = Box::into_raw(Box::new(PregateRouterState(Mutex::new(state))));
        Ok(())
    })
}

/// Routes `n` tokens that follow those already in `s`: `experts_out` and `weights_out` receive
/// `n * top_k` values (each token's experts, most heavily weighted first). On error the state
/// has not advanced.
///
/// # Safety
/// `r` and `s` must be live; `ids` must point to `n` readable ids, `experts_out` and `weights_out`
/// to `n * top_k` writable elements.
#[no_mangle]
pub unsafe extern "C" fn pregate_router_route(
    r: *const PregateRouter,
    s: *mut PregateRouterState,
    ids: *const u32,
    n: u64,
    experts_out: *mut i32,
    weights_out: *mut f32,
) -> Status {
    guard("pregate_router_route", || {
        // SAFETY: the caller's contract.
        let (r, s) = unsafe { (ffi::non_null(r, "r")?, ffi::non_null(s, "s")?) };
        let n = usize::try_from(n).map_err(|_| Failure::invalid("n overflows"))?;
        let k = r.0.top_k();
        let len = ffi::product(n as u64, k as u64, "n x top_k")?;
        // SAFETY: the caller's contract on the extents.
        let (ids, experts, weights) = unsafe {
            (
                ffi::slice(ids, n, "ids")?,
                ffi::slice_mut(experts_out, len, "experts_out")?,
                ffi::slice_mut(weights_out, len, "weights_out")?,
            )
        };
        let mut state =
            s.0.lock()
                .map_err(|_| Failure::state("a previous call on this state failed midway"))?;
        let routes = r.0.route(&mut state, ids)?;
        write_routes(&routes, k, experts, weights)
    })
}

fn write_routes(
    routes: &[pregate::TokenRoute],
    k: usize,
    experts: &mut [i32],
    weights: &mut [f32],
) -> CallResult {
    for ((route, e), w) in routes
        .iter()
        .zip(experts.chunks_exact_mut(k))
        .zip(weights.chunks_exact_mut(k))
    {
        e.fill(-1);
        w.fill(0.0);
        for (j, (&x, &y)) in route.experts().iter().zip(route.weights()).enumerate() {
            e[j] = x as i32;
            w[j] = y;
        }
    }
    Ok(())
}

/// Frees a state (NULL: nothing).
///
/// # Safety
/// `s` must be NULL or a live state from `pregate_router_state_new`, freed once.
#[no_mangle]
pub unsafe extern "C" fn pregate_router_state_free(s: *mut PregateRouterState) {
    let _ = guard("pregate_router_state_free", || {
        if !s.is_null() {
            // SAFETY: from `Box::into_raw`, freed once (the caller's contract).
            drop(unsafe { Box::from_raw(s) });
        }
        Ok(())
    });
}

/// Closes a router (NULL: nothing). Its states must be freed first.
///
/// # Safety
/// `r` must be NULL or a live router from `pregate_router_open`, closed once.
#[no_mangle]
pub unsafe extern "C" fn pregate_router_close(r: *mut PregateRouter) {
    let _ = guard("pregate_router_close", || {
        if !r.is_null() {
            // SAFETY: from `Box::into_raw`, closed once (the caller's contract).
            drop(unsafe { Box::from_raw(r) });
        }
        Ok(())
    });
}
