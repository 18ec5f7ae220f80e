//! The cxx bridge to the C++ shim (`shim/shim.cc`) over Triton's C API.
//!
//! Every shim function that can fail returns `Result`: a `TRITONSERVER_Error` becomes a C++
//! exception and then `Err(cxx::Exception)` here. The Triton objects are opaque C types declared in
//! `include/pregate_triton_api.h`.

#[cxx::bridge(namespace = "pregate_triton")]
#[allow(missing_docs, clippy::missing_safety_doc)]
pub mod ffi {
    /// One request parameter: its key, its `TRITONSERVER_ParameterType` and its value in the field
    /// of that type (`text` for STRING, `int_value` for INT, `bool_value` for BOOL, `double_value`
    /// for DOUBLE; a BYTES value is not copied).
    #[derive(Debug, Clone, PartialEq)]
    struct RequestParameter {
        key: String,
        kind: u32,
        text: String,
        int_value: i64,
        bool_value: bool,
        double_value: f64,
    }

    unsafe extern "C++" {
        include!("pregate-triton/shim/shim.h");

        #[namespace = ""]
        type TRITONSERVER_Error;
        #[namespace = ""]
        type TRITONSERVER_MetricFamily;
        #[namespace = ""]
        type TRITONSERVER_Metric;
        #[namespace = ""]
        type TRITONBACKEND_Backend;
        #[namespace = ""]
        type TRITONBACKEND_Model;
        #[namespace = ""]
        type TRITONBACKEND_ModelInstance;
        #[namespace = ""]
        type TRITONBACKEND_Request;
        #[namespace = ""]
        type TRITONBACKEND_ResponseFactory;

        fn api_version(major: &mut u32, minor: &mut u32) -> Result<()>;
        fn error_new(code: u32, msg: &str) -> *mut TRITONSERVER_Error;
        fn log_message(level: u32, msg: &str);

        unsafe fn model_name(model: *mut TRITONBACKEND_Model) -> Result<String>;
        unsafe fn model_version(model: *mut TRITONBACKEND_Model) -> Result<u64>;
        unsafe fn model_repository(model: *mut TRITONBACKEND_Model) -> Result<String>;
        unsafe fn model_config_json(model: *mut TRITONBACKEND_Model) -> Result<String>;

        unsafe fn model_set_state(model: *mut TRITONBACKEND_Model, state: usize) -> Result<()>;
        unsafe fn model_state(model: *mut TRITONBACKEND_Model) -> Result<usize>;
        unsafe fn instance_set_state(
            instance: *mut TRITONBACKEND_ModelInstance,
            state: usize,
        ) -> Result<()>;
        unsafe fn instance_state(instance: *mut TRITONBACKEND_ModelInstance) -> Result<usize>;

        unsafe fn instance_name(instance: *mut TRITONBACKEND_ModelInstance) -> Result<String>;
        unsafe fn instance_kind(instance: *mut TRITONBACKEND_ModelInstance) -> Result<u32>;
        unsafe fn instance_device_id(instance: *mut TRITONBACKEND_ModelInstance) -> Result<i32>;
        unsafe fn instance_model(
            instance: *mut TRITONBACKEND_ModelInstance,
        ) -> Result<*mut TRITONBACKEND_Model>;

        unsafe fn request_id(request: *mut TRITONBACKEND_Request) -> Result<String>;
        unsafe fn request_input_names(request: *mut TRITONBACKEND_Request) -> Result<Vec<String>>;
        unsafe fn request_parameters(
            request: *mut TRITONBACKEND_Request,
        ) -> Result<Vec<RequestParameter>>;
        unsafe fn request_input(
            request: *mut TRITONBACKEND_Request,
            name: &str,
            datatype: &mut u32,
            shape: &mut Vec<i64>,
            data: &mut Vec<u8>,
        ) -> Result<bool>;
        unsafe fn request_release(request: *mut TRITONBACKEND_Request) -> Result<()>;

        unsafe fn factory_new(
            request: *mut TRITONBACKEND_Request,
        ) -> Result<*mut TRITONBACKEND_ResponseFactory>;
        unsafe fn factory_delete(factory: *mut TRITONBACKEND_ResponseFactory) -> Result<()>;
        unsafe fn factory_is_cancelled(factory: *mut TRITONBACKEND_ResponseFactory)
            -> Result<bool>;
        unsafe fn factory_send_final(factory: *mut TRITONBACKEND_ResponseFactory) -> Result<()>;
        unsafe fn send_tokens(
            factory: *mut TRITONBACKEND_ResponseFactory,
            text: &[u8],
            ids: &[i32],
            final_response: bool,
        ) -> Result<()>;
        unsafe fn send_error(
            factory: *mut TRITONBACKEND_ResponseFactory,
            code: u32,
            msg: &str,
        ) -> Result<()>;

        fn metric_family_new(
            kind: u32,
            name: &str,
            description: &str,
        ) -> Result<*mut TRITONSERVER_MetricFamily>;
        unsafe fn metric_family_delete(family: *mut TRITONSERVER_MetricFamily) -> Result<()>;
        unsafe fn metric_new(
            family: *mut TRITONSERVER_MetricFamily,
            labels: &[String],
        ) -> Result<*mut TRITONSERVER_Metric>;
        unsafe fn metric_delete(metric: *mut TRITONSERVER_Metric) -> Result<()>;
        unsafe fn metric_set(metric: *mut TRITONSERVER_Metric, value: f64) -> Result<()>;
        unsafe fn metric_increment(metric: *mut TRITONSERVER_Metric, value: f64) -> Result<()>;
    }
}

/// `TRITONSERVER_Error_Code` values.
pub mod code {
    /// TRITONSERVER_ERROR_INTERNAL
    pub const INTERNAL: u32 = 1;
    /// TRITONSERVER_ERROR_NOT_FOUND
    pub const NOT_FOUND: u32 = 2;
    /// TRITONSERVER_ERROR_INVALID_ARG
    pub const INVALID_ARG: u32 = 3;
    /// TRITONSERVER_ERROR_UNAVAILABLE
    pub const UNAVAILABLE: u32 = 4;
    /// TRITONSERVER_ERROR_UNSUPPORTED
    pub const UNSUPPORTED: u32 = 5;
    /// TRITONSERVER_ERROR_CANCELLED
    pub const CANCELLED: u32 = 7;
}

/// `TRITONSERVER_DataType` values.
pub mod dtype {
    /// TRITONSERVER_TYPE_BOOL
    pub const BOOL: u32 = 1;
    /// TRITONSERVER_TYPE_INT32
    pub const INT32: u32 = 8;
    /// TRITONSERVER_TYPE_BYTES
    pub const BYTES: u32 = 13;
}

/// `TRITONSERVER_ParameterType` values.
pub mod param_type {
    /// TRITONSERVER_PARAMETER_STRING
    pub const STRING: u32 = 0;
    /// TRITONSERVER_PARAMETER_INT
    pub const INT: u32 = 1;
    /// TRITONSERVER_PARAMETER_BOOL
    pub const BOOL: u32 = 2;
    /// TRITONSERVER_PARAMETER_DOUBLE
    pub const DOUBLE: u32 = 3;
    /// TRITONSERVER_PARAMETER_BYTES
    pub const BYTES: u32 = 4;
}

/// `TRITONSERVER_LogLevel` values.
pub mod log {
    /// TRITONSERVER_LOG_INFO
    pub const INFO: u32 = 0;
    /// TRITONSERVER_LOG_WARN
    pub const WARN: u32 = 1;
    /// TRITONSERVER_LOG_ERROR
    pub const ERROR: u32 = 2;
    /// TRITONSERVER_LOG_VERBOSE
    pub const VERBOSE: u32 = 3;
}

/// `TRITONSERVER_InstanceGroupKind` values.
pub mod kind {
    /// TRITONSERVER_INSTANCEGROUPKIND_AUTO
    pub const AUTO: u32 = 0;
    /// TRITONSERVER_INSTANCEGROUPKIND_CPU
    pub const CPU: u32 = 1;
    /// TRITONSERVER_INSTANCEGROUPKIND_GPU
    pub const GPU: u32 = 2;
    /// TRITONSERVER_INSTANCEGROUPKIND_MODEL
    pub const MODEL: u32 = 3;
}

/// `TRITONSERVER_MetricKind` values.
pub mod metric_kind {
    /// TRITONSERVER_METRIC_KIND_COUNTER
    pub const COUNTER: u32 = 0;
    /// TRITONSERVER_METRIC_KIND_GAUGE
    pub const GAUGE: u32 = 1;
}
