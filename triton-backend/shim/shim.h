// The C++ side of the cxx bridge (src/bridge.rs): thin wrappers over Triton's C API.
//
// Each wrapper turns a returned TRITONSERVER_Error into a C++ exception, which cxx hands to Rust
// as `Err(cxx::Exception)`; the error object is deleted here. No wrapper keeps state.
#pragma once

#include <cstdint>

#include "pregate_triton_api.h"
#include "rust/cxx.h"

namespace pregate_triton {
struct RequestParameter;
}  // namespace pregate_triton

namespace pregate_triton {

void api_version(uint32_t& major, uint32_t& minor);
TRITONSERVER_Error* error_new(uint32_t code, rust::Str msg) noexcept;
void log_message(uint32_t level, rust::Str msg) noexcept;

rust::String model_name(TRITONBACKEND_Model* model);
uint64_t model_version(TRITONBACKEND_Model* model);
rust::String model_repository(TRITONBACKEND_Model* model);
rust::String model_config_json(TRITONBACKEND_Model* model);

void model_set_state(TRITONBACKEND_Model* model, size_t state);
size_t model_state(TRITONBACKEND_Model* model);
void instance_set_state(TRITONBACKEND_ModelInstance* instance, size_t state);
size_t instance_state(TRITONBACKEND_ModelInstance* instance);
rust::String instance_name(TRITONBACKEND_ModelInstance* instance);
uint32_t instance_kind(TRITONBACKEND_ModelInstance* instance);
int32_t instance_device_id(TRITONBACKEND_ModelInstance* instance);
TRITONBACKEND_Model* instance_model(TRITONBACKEND_ModelInstance* instance);

rust::String request_id(TRITONBACKEND_Request* request);
rust::Vec<rust::String> request_input_names(TRITONBACKEND_Request* request);
rust::Vec<RequestParameter> request_parameters(TRITONBACKEND_Request* request);
bool request_input(
    TRITONBACKEND_Request* request, rust::Str name, uint32_t& datatype,
    rust::Vec<int64_t>& shape, rust::Vec<uint8_t>& data);
void request_release(TRITONBACKEND_Request* request);

TRITONBACKEND_ResponseFactory* factory_new(TRITONBACKEND_Request* request);
void factory_delete(TRITONBACKEND_ResponseFactory* factory);
bool factory_is_cancelled(TRITONBACKEND_ResponseFactory* factory);
void factory_send_final(TRITONBACKEND_ResponseFactory* factory);
void send_tokens(
    TRITONBACKEND_ResponseFactory* factory, rust::Slice<const uint8_t> text,
    rust::Slice<const int32_t> ids, bool final_response);
void send_error(
    TRITONBACKEND_ResponseFactory* factory, uint32_t code, rust::Str msg);

TRITONSERVER_MetricFamily* metric_family_new(
    uint32_t kind, rust::Str name, rust::Str description);
void metric_family_delete(TRITONSERVER_MetricFamily* family);
TRITONSERVER_Metric* metric_new(
    TRITONSERVER_MetricFamily* family, rust::Slice<const rust::String> labels);
void metric_delete(TRITONSERVER_Metric* metric);
void metric_set(TRITONSERVER_Metric* metric, double value);
void metric_increment(TRITONSERVER_Metric* metric, double value);

}  // namespace pregate_triton
