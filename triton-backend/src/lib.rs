//! `libtriton_pregate.so`: a Triton Inference Server backend (backend name `pregate`) serving
//! pregate models with streaming generation.
//!
//! Three lifetimes, as Triton's own backends have them: the backend ([`TRITONBACKEND_Initialize`]:
//! API version check, metric families), the model ([`ModelState`]: `config.pbtxt` parsed and the
//! model directory opened once) and the instance ([`InstanceState`]: an engine on the instance's
//! device, owned by a [`pregate::serve::Server`] thread). `Execute` copies each request's inputs,
//! creates its response factory, releases the request and submits it to the serving loop; the loop
//! streams the responses. The model is decoupled, so clients use `generate_stream` or the gRPC
//! stream.
//!
//! Every entry point catches panics and returns a `TRITONSERVER_Error`; every request gets a final
//! response (an error response if need be). Triton's C API is called through the cxx bridge in
//! [`bridge`]; its symbols are left undefined and resolve from the server at load.
#![warn(missing_docs)]

pub mod bridge;
pub mod config;
pub mod metrics;
pub mod request;
pub mod sink;

use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use pregate::engine::open_engine_with;
use pregate::model::ModelDir;
use pregate::serve::{panic_message, ServeConfig, Server, StepObserver};

use bridge::{code, ffi, log, param_type};
use config::ModelParams;
use metrics::{Families, InstanceMetrics, LibraryMirror};
use request::{ParamValue, RawInput, RawParameter};
use sink::{Factory, TritonSink};

/// The TRITONBACKEND API major version this backend is built for.
pub const API_MAJOR: u32 = 1;
/// The oldest TRITONBACKEND API minor version with every function the backend calls.
pub const API_MINOR: u32 = 19;

/// An error for Triton: a code and a message.
type TResult<T> = Result<T, (u32, String)>;

fn internal<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> (u32, String) + '_ {
    move |e| (code::INTERNAL, format!("{what}: {e}"))
}

/// Runs `f`, turning an error or a panic into a `TRITONSERVER_Error*` (null on success).
fn guard(what: &str, f: impl FnOnce() -> TResult<()>) -> *mut ffi::TRITONSERVER_Error {
    let r = catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
        Err((
            code::INTERNAL,
            format!("pregate: {what} panicked: {}", panic_message(&*p)),
        ))
    });
    match r {
        Ok(()) => std::ptr::null_mut(),
        Err((c, msg)) => {
            ffi::log_message(log::ERROR, &msg);
            ffi::error_new(c, &msg)
        }
    }
}

/// A model's state: its parameters and opened model directory.
pub struct ModelState {
    /// The model's name in the repository.
    pub name: String,
    /// Its parameters.
    pub params: ModelParams,
    /// The opened model directory (config, tokenizer, mapped weights).
    pub model: ModelDir,
    /// The library metrics its serving loops record into, and their mirror into Triton's
    /// metrics (when metrics are on and the name is a valid label).
    pub library_metrics: Option<(pregate::metrics::ModelMetrics, Arc<LibraryMirror>)>,
}

/// An instance's state: the serving loop and its metrics.
pub struct InstanceState {
    /// The serving loop (None once shut down).
    pub server: Option<Server>,
    /// The instance's metrics, when enabled.
    pub metrics: Option<Arc<InstanceMetrics>>,
}

/// Backend initialization: checks the API version and creates the metric families.
#[no_mangle]
pub extern "C" fn TRITONBACKEND_Initialize(
    _backend: *mut ffi::TRITONBACKEND_Backend,
) -> *mut ffi::TRITONSERVER_Error {
    guard("TRITONBACKEND_Initialize", || {
        let (mut major, mut minor) = (0, 0);
        ffi::api_version(&mut major, &mut minor).map_err(internal("API version"))?;
        ffi::log_message(
            log::INFO,
            &format!(
                "pregate backend {}: Triton backend API {major}.{minor}",
                env!("CARGO_PKG_VERSION")
            ),
        );
        if major != API_MAJOR || minor < API_MINOR {
            return Err((
                code::UNSUPPORTED,
                format!(
                    "the pregate backend needs Triton backend API {API_MAJOR}.>={API_MINOR}; this \
                     server has {major}.{minor}"
                ),
            ));
        }
        Families::create().map_err(|e| (code::INTERNAL, e))
    })
}

/// Backend finalization: deletes the metric families.
#[no_mangle]
pub extern "C" fn TRITONBACKEND_Finalize(
    _backend: *mut ffi::TRITONBACKEND_Backend,
) -> *mut ffi::TRITONSERVER_Error {
    guard("TRITONBACKEND_Finalize", || {
        Families::delete();
        Ok(())
    })
}

/// Model initialization: parses config.pbtxt and opens the model directory.
///
/// # Safety
/// `model` must be the live model Triton passes.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInitialize(
    model: *mut ffi::TRITONBACKEND_Model,
) -> *mut ffi::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelInitialize", || {
        // SAFETY: `model` is live for this call (Triton's contract).
        let (name, repo, json) = unsafe {
            (
                ffi::model_name(model).map_err(internal("model name"))?,
                ffi::model_repository(model).map_err(internal("model repository"))?,
                ffi::model_config_json(model).map_err(internal("model config"))?,
            )
        };
        let bad = |m: String| (code::INVALID_ARG, format!("pregate model `{name}`: {m}"));
        let params = config::parse_model_config(&json, std::path::Path::new(&repo)).map_err(bad)?;
        let dir = ModelDir::open(&params.model_dir).map_err(|e| {
            (
                sink::error_code(&e),
                format!(
                    "pregate model `{name}`: cannot open model directory {}: {e}",
                    params.model_dir.display()
                ),
            )
        })?;
        ffi::log_message(
            log::INFO,
            &format!(
                "pregate model `{name}`: {} ({} layers, {} experts), batching {} with {} tokens per step",
                params.model_dir.display(),
                dir.config.num_hidden_layers,
                dir.config.n_cluster,
                params.batcher.policy,
                params.batcher.max_batch_tokens
            ),
        );
        let library_metrics = if params.metrics {
            match pregate::metrics::model_metrics(&name) {
                Ok(m) => Some((m, Arc::new(LibraryMirror::new(&name)))),
                Err(e) => {
                    ffi::log_message(
                        log::WARN,
                        &format!("pregate model `{name}`: no expert cache or batch metrics: {e}"),
                    );
                    None
                }
            }
        } else {
            None
        };
        let state = Box::new(ModelState {
            name: name.clone(),
            params,
            model: dir,
            library_metrics,
        });
        let ptr = Box::into_raw(state);
        // SAFETY: `model` is live; the state is reclaimed in ModelFinalize.
        if let Err(e) = unsafe { ffi::model_set_state(model, ptr as usize) } {
            // SAFETY: not handed to Triton, so still ours.
            drop(unsafe { Box::from_raw(ptr) });
            return Err(internal("model state")(e));
        }
        Ok(())
    })
}

/// Model finalization: drops the model state.
///
/// # Safety
/// `model` must be the live model Triton passes.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelFinalize(
    model: *mut ffi::TRITONBACKEND_Model,
) -> *mut ffi::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelFinalize", || {
        // SAFETY: the state was set by ModelInitialize from Box::into_raw; taken once here.
        let p = unsafe { ffi::model_state(model) }.map_err(internal("model state"))?;
        if p != 0 {
            drop(unsafe { Box::from_raw(p as *mut ModelState) });
        }
        Ok(())
    })
}

/// Instance initialization: opens an engine on the instance's device and starts its serving loop.
///
/// # Safety
/// `instance` must be the live instance Triton passes.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceInitialize(
    instance: *mut ffi::TRITONBACKEND_ModelInstance,
) -> *mut ffi::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelInstanceInitialize", || {
        // SAFETY: `instance` is live for this call; the model state outlives its instances.
        let (iname, kind, device_id, ms) = unsafe {
            let model = ffi::instance_model(instance).map_err(internal("instance model"))?;
            let p = ffi::model_state(model).map_err(internal("model state"))?;
            if p == 0 {
                return Err((code::INTERNAL, "the model has no state".into()));
            }
            (
                ffi::instance_name(instance).map_err(internal("instance name"))?,
                ffi::instance_kind(instance).map_err(internal("instance kind"))?,
                ffi::instance_device_id(instance).map_err(internal("device id"))?,
                &*(p as *const ModelState),
            )
        };
        let bad = |m: String| {
            (
                code::INVALID_ARG,
                format!("pregate instance `{iname}`: {m}"),
            )
        };
        let device = config::instance_device(&ms.params, kind, device_id).map_err(bad)?;
        // The environment's options first (the documented PREGATE_* table), then the model's.
        let options = pregate::engine::EngineOptions::from_env()
            .map_err(|e| {
                (
                    sink::error_code(&e),
                    format!("pregate instance `{iname}`: {e}"),
                )
            })?
            .overridden_by(&ms.params.engine_options());
        let engine = open_engine_with(&ms.model, device, &options).map_err(|e| {
            // Only a device instance can be moved to the CPU.
            let hint = match device {
                pregate::engine::Device::Cpu => "",
                _ => " (use instance_group kind KIND_CPU to serve on the CPU)",
            };
            (
                sink::error_code(&e),
                format!("pregate instance `{iname}`: cannot open the model on {device}: {e}{hint}"),
            )
        })?;
        let metrics = if ms.params.metrics {
            Some(Arc::new(
                InstanceMetrics::new(&ms.name, &iname).map_err(|e| (code::INTERNAL, e))?,
            ))
        } else {
            None
        };
        let mirror = ms.library_metrics.as_ref().map(|(_, m)| m.clone());
        let on_step = metrics.clone().map(|m| {
            let f: StepObserver = Arc::new(move |s| {
                m.update(s);
                if let Some(mirror) = &mirror {
                    mirror.update();
                }
            });
            f
        });
        let cfg = ServeConfig {
            batcher: ms.params.batcher.clone(),
            on_step,
            metrics: ms.library_metrics.as_ref().map(|(m, _)| m.clone()),
            thread_name: format!("pregate-{iname}"),
            max_queue_wait: ms.params.max_queue_wait,
            max_waiting: ms.params.max_waiting,
            max_prompt_bytes: ms.params.max_prompt_bytes,
            kv_memory_bytes: ms.params.kv_memory_bytes,
            ..ServeConfig::default()
        };
        ffi::log_message(
            log::INFO,
            &format!(
                "pregate instance `{iname}`: engine on {}, expert cache: {}",
                engine.device_name(),
                engine
                    .expert_cache()
                    .map_or("none".to_string(), |c| format!(
                        "{} slots of {} bytes, {}",
                        c.capacity(),
                        c.unit_bytes(),
                        c.policy()
                    ))
            ),
        );
        let server = Server::start(engine, ms.model.tokenizer.clone(), cfg)
            .map_err(internal("serving loop"))?;
        let state = Box::into_raw(Box::new(InstanceState {
            server: Some(server),
            metrics,
        }));
        // SAFETY: `instance` is live; the state is reclaimed in ModelInstanceFinalize.
        if let Err(e) = unsafe { ffi::instance_set_state(instance, state as usize) } {
            // SAFETY: not handed to Triton, so still ours.
            drop(unsafe { Box::from_raw(state) });
            return Err(internal("instance state")(e));
        }
        Ok(())
    })
}

/// Instance finalization: stops the serving loop (live requests get error responses) and drops
/// the engine and the metrics.
///
/// # Safety
/// `instance` must be the live instance Triton passes.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceFinalize(
    instance: *mut ffi::TRITONBACKEND_ModelInstance,
) -> *mut ffi::TRITONSERVER_Error {
    guard("TRITONBACKEND_ModelInstanceFinalize", || {
        // SAFETY: set by ModelInstanceInitialize from Box::into_raw; taken once here.
        let p = unsafe { ffi::instance_state(instance) }.map_err(internal("instance state"))?;
        if p != 0 {
            let mut state = unsafe { Box::from_raw(p as *mut InstanceState) };
            if let Some(s) = state.server.take() {
                s.shutdown();
            }
            drop(state);
        }
        Ok(())
    })
}

/// Reads every input of a request.
///
/// # Safety
/// `request` must be live.
unsafe fn read_inputs(
    request: *mut ffi::TRITONBACKEND_Request,
) -> Result<HashMap<String, RawInput>, String> {
    // SAFETY: `request` is live (caller's contract).
    let names = unsafe { ffi::request_input_names(request) }.map_err(|e| e.to_string())?;
    let mut inputs = HashMap::new();
    for name in names {
        let mut t = RawInput {
            datatype: 0,
            shape: Vec::new(),
            data: Vec::new(),
        };
        // SAFETY: as above.
        let present = unsafe {
            ffi::request_input(request, &name, &mut t.datatype, &mut t.shape, &mut t.data)
        }
        .map_err(|e| e.to_string())?;
        if present {
            inputs.insert(name.to_string(), t);
        }
    }
    Ok(inputs)
}

/// Reads every parameter of a request.
///
/// # Safety
/// `request` must be live.
unsafe fn read_parameters(
    request: *mut ffi::TRITONBACKEND_Request,
) -> Result<Vec<RawParameter>, String> {
    // SAFETY: `request` is live (caller's contract).
    let params = unsafe { ffi::request_parameters(request) }.map_err(|e| e.to_string())?;
    params
        .into_iter()
        .map(|p| {
            let value = match p.kind {
                param_type::STRING => ParamValue::String(p.text),
                param_type::INT => ParamValue::Int(p.int_value),
                param_type::BOOL => ParamValue::Bool(p.bool_value),
                param_type::DOUBLE => ParamValue::Double(p.double_value),
                param_type::BYTES => ParamValue::Bytes,
                other => {
                    return Err(format!(
                        "request parameter {} has an unknown type ({other})",
                        p.key
                    ))
                }
            };
            Ok(RawParameter { key: p.key, value })
        })
        .collect()
}

/// Handles one request: copies its inputs, creates its response factory, releases it and submits
/// it to the serving loop (or answers it with an error).
///
/// # Safety
/// `request` must be live and owned by the backend; it is released here.
unsafe fn handle_request(server: &Server, request: *mut ffi::TRITONBACKEND_Request) {
    // SAFETY: `request` is live until released below.
    let factory = match unsafe { ffi::factory_new(request) } {
        Ok(f) => Factory(f),
        Err(e) => {
            ffi::log_message(log::ERROR, &format!("pregate: no response factory: {e}"));
            // SAFETY: released once.
            let _ = unsafe { ffi::request_release(request) };
            return;
        }
    };
    let parsed = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the request is live until released below.
        let inputs = unsafe { read_inputs(request) }?;
        // SAFETY: as above.
        let params = unsafe { read_parameters(request) }?;
        request::parse_request_with_parameters(&inputs, &params)
    }))
    .unwrap_or_else(|p| {
        Err(format!(
            "reading the request panicked: {}",
            panic_message(&*p)
        ))
    });
    // SAFETY: every input was copied; the factory outlives the request.
    if let Err(e) = unsafe { ffi::request_release(request) } {
        ffi::log_message(log::ERROR, &format!("pregate: request release failed: {e}"));
    }
    match parsed {
        Ok(p) => {
            if !p.ignored_parameters.is_empty() {
                ffi::log_message(
                    log::VERBOSE,
                    &format!(
                        "pregate: ignored request parameters pregate does not read: {}",
                        p.ignored_parameters.join(", ")
                    ),
                );
            }
            let prefix = if p.stream || p.exclude_input {
                None
            } else {
                p.prompt_text.clone()
            };
            let sink = TritonSink::new(factory, p.stream, prefix);
            server.submit(p.request, Box::new(sink));
        }
        Err(msg) => {
            let mut sink = TritonSink::new(factory, true, None);
            sink.send_error(code::INVALID_ARG, &format!("pregate: {msg}"));
        }
    }
}

/// Execute: hands every request to the instance's serving loop and returns at once.
///
/// # Safety
/// `instance` must be live and `requests` must point to `request_count` live requests.
#[no_mangle]
pub unsafe extern "C" fn TRITONBACKEND_ModelInstanceExecute(
    instance: *mut ffi::TRITONBACKEND_ModelInstance,
    requests: *mut *mut ffi::TRITONBACKEND_Request,
    request_count: u32,
) -> *mut ffi::TRITONSERVER_Error {
    // SAFETY: Triton passes `request_count` valid request pointers.
    let reqs: Vec<*mut ffi::TRITONBACKEND_Request> = if requests.is_null() {
        Vec::new()
    } else {
        unsafe { std::slice::from_raw_parts(requests, request_count as usize) }.to_vec()
    };
    let mut done = 0;
    let result = catch_unwind(AssertUnwindSafe(|| -> TResult<()> {
        // SAFETY: the instance state lives until ModelInstanceFinalize, after the last Execute.
        let p = unsafe { ffi::instance_state(instance) }.map_err(internal("instance state"))?;
        let state = (p != 0).then(|| unsafe { &*(p as *const InstanceState) });
        let server = state
            .and_then(|s| s.server.as_ref())
            .ok_or((code::UNAVAILABLE, "the instance is not running".to_string()))?;
        for &r in &reqs {
            done += 1;
            // SAFETY: each request is live and handled (released) exactly once.
            unsafe { handle_request(server, r) };
        }
        Ok(())
    }));
    let failure = match result {
        Ok(Ok(())) => return std::ptr::null_mut(),
        Ok(Err((_, msg))) => msg,
        Err(p) => format!("Execute panicked: {}", panic_message(&*p)),
    };
    ffi::log_message(log::ERROR, &format!("pregate: {failure}"));
    // Requests not handed over yet still need an answer: an error response, then release. Every
    // request is then answered and released, so Execute reports success to Triton.
    for &r in &reqs[done.min(reqs.len())..] {
        // SAFETY: requests from `done` on were not touched; each is answered and released once.
        unsafe {
            if let Ok(f) = ffi::factory_new(r) {
                let mut s = TritonSink::new(Factory(f), true, None);
                s.send_error(code::INTERNAL, &format!("pregate: {failure}"));
            }
            let _ = ffi::request_release(r);
        }
    }
    std::ptr::null_mut()
}
