// Thin wrappers over Triton's C API; see shim.h.
#include "pregate-triton/shim/shim.h"
#include "pregate-triton/src/bridge.rs.h"

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

// The Rust side (src/bridge.rs) mirrors these values as constants.
static_assert(TRITONSERVER_ERROR_INTERNAL == 1 && TRITONSERVER_ERROR_INVALID_ARG == 3, "codes");
static_assert(TRITONSERVER_ERROR_NOT_FOUND == 2, "codes");
static_assert(TRITONSERVER_ERROR_UNAVAILABLE == 4 && TRITONSERVER_ERROR_UNSUPPORTED == 5, "codes");
static_assert(TRITONSERVER_ERROR_CANCELLED == 7, "codes");
static_assert(TRITONSERVER_TYPE_BOOL == 1 && TRITONSERVER_TYPE_INT32 == 8, "types");
static_assert(TRITONSERVER_TYPE_BYTES == 13, "types");
static_assert(TRITONSERVER_PARAMETER_STRING == 0 && TRITONSERVER_PARAMETER_INT == 1, "parameter types");
static_assert(TRITONSERVER_PARAMETER_BOOL == 2 && TRITONSERVER_PARAMETER_DOUBLE == 3, "parameter types");
static_assert(TRITONSERVER_PARAMETER_BYTES == 4, "parameter types");
static_assert(TRITONSERVER_LOG_INFO == 0 && TRITONSERVER_LOG_WARN == 1, "log levels");
static_assert(TRITONSERVER_LOG_ERROR == 2, "log levels");
static_assert(TRITONSERVER_INSTANCEGROUPKIND_CPU == 1 && TRITONSERVER_INSTANCEGROUPKIND_GPU == 2, "kinds");
static_assert(TRITONSERVER_INSTANCEGROUPKIND_MODEL == 3, "kinds");
static_assert(TRITONSERVER_METRIC_KIND_COUNTER == 0 && TRITONSERVER_METRIC_KIND_GAUGE == 1, "kinds");

namespace pregate_triton {
namespace {

// Throws the message of `err` (and deletes it) when it is not null.
void check(TRITONSERVER_Error* err, const char* what) {
  if (err == nullptr) {
    return;
  }
  std::string msg = std::string(what) + ": " + TRITONSERVER_ErrorMessage(err);
  TRITONSERVER_ErrorDelete(err);
  throw std::runtime_error(msg);
}

std::string to_std(rust::Str s) { return std::string(s.data(), s.size()); }

}  // namespace

void api_version(uint32_t& major, uint32_t& minor) {
  check(TRITONBACKEND_ApiVersion(&major, &minor), "TRITONBACKEND_ApiVersion");
}

TRITONSERVER_Error* error_new(uint32_t code, rust::Str msg) noexcept {
  std::string m = to_std(msg);
  return TRITONSERVER_ErrorNew(static_cast<TRITONSERVER_Error_Code>(code), m.c_str());
}

void log_message(uint32_t level, rust::Str msg) noexcept {
  auto lvl = static_cast<TRITONSERVER_LogLevel>(level);
  if (!TRITONSERVER_LogIsEnabled(lvl)) {
    return;
  }
  std::string m = to_std(msg);
  TRITONSERVER_Error* err = TRITONSERVER_LogMessage(lvl, "pregate", 0, m.c_str());
  if (err != nullptr) {
    TRITONSERVER_ErrorDelete(err);
  }
}

rust::String model_name(TRITONBACKEND_Model* model) {
  const char* name = nullptr;
  check(TRITONBACKEND_ModelName(model, &name), "TRITONBACKEND_ModelName");
  return rust::String(name == nullptr ? "" : name);
}

uint64_t model_version(TRITONBACKEND_Model* model) {
  uint64_t v = 0;
  check(TRITONBACKEND_ModelVersion(model, &v), "TRITONBACKEND_ModelVersion");
  return v;
}

rust::String model_repository(TRITONBACKEND_Model* model) {
  TRITONBACKEND_ArtifactType kind;
  const char* location = nullptr;
  check(TRITONBACKEND_ModelRepository(model, &kind, &location), "TRITONBACKEND_ModelRepository");
  return rust::String(location == nullptr ? "" : location);
}

rust::String model_config_json(TRITONBACKEND_Model* model) {
  TRITONSERVER_Message* msg = nullptr;
  check(TRITONBACKEND_ModelConfig(model, 1, &msg), "TRITONBACKEND_ModelConfig");
  const char* base = nullptr;
  size_t size = 0;
  TRITONSERVER_Error* err = TRITONSERVER_MessageSerializeToJson(msg, &base, &size);
  if (err != nullptr) {
    TRITONSERVER_MessageDelete(msg);
    check(err, "TRITONSERVER_MessageSerializeToJson");
  }
  rust::String json(base, size);
  check(TRITONSERVER_MessageDelete(msg), "TRITONSERVER_MessageDelete");
  return json;
}

void model_set_state(TRITONBACKEND_Model* model, size_t state) {
  check(TRITONBACKEND_ModelSetState(model, reinterpret_cast<void*>(state)), "TRITONBACKEND_ModelSetState");
}

size_t model_state(TRITONBACKEND_Model* model) {
  void* state = nullptr;
  check(TRITONBACKEND_ModelState(model, &state), "TRITONBACKEND_ModelState");
  return reinterpret_cast<size_t>(state);
}

void instance_set_state(TRITONBACKEND_ModelInstance* instance, size_t state) {
  check(
      TRITONBACKEND_ModelInstanceSetState(instance, reinterpret_cast<void*>(state)),
      "TRITONBACKEND_ModelInstanceSetState");
}

size_t instance_state(TRITONBACKEND_ModelInstance* instance) {
  void* state = nullptr;
  check(TRITONBACKEND_ModelInstanceState(instance, &state), "TRITONBACKEND_ModelInstanceState");
  return reinterpret_cast<size_t>(state);
}

rust::String instance_name(TRITONBACKEND_ModelInstance* instance) {
  const char* name = nullptr;
  check(TRITONBACKEND_ModelInstanceName(instance, &name), "TRITONBACKEND_ModelInstanceName");
  return rust::String(name == nullptr ? "" : name);
}

uint32_t instance_kind(TRITONBACKEND_ModelInstance* instance) {
  TRITONSERVER_InstanceGroupKind kind;
  check(TRITONBACKEND_ModelInstanceKind(instance, &kind), "TRITONBACKEND_ModelInstanceKind");
  return static_cast<uint32_t>(kind);
}

int32_t instance_device_id(TRITONBACKEND_ModelInstance* instance) {
  int32_t id = 0;
  check(TRITONBACKEND_ModelInstanceDeviceId(instance, &id), "TRITONBACKEND_ModelInstanceDeviceId");
  return id;
}

TRITONBACKEND_Model* instance_model(TRITONBACKEND_ModelInstance* instance) {
  TRITONBACKEND_Model* model = nullptr;
  check(TRITONBACKEND_ModelInstanceModel(instance, &model), "TRITONBACKEND_ModelInstanceModel");
  return model;
}

rust::String request_id(TRITONBACKEND_Request* request) {
  const char* id = nullptr;
  check(TRITONBACKEND_RequestId(request, &id), "TRITONBACKEND_RequestId");
  return rust::String(id == nullptr ? "" : id);
}

rust::Vec<rust::String> request_input_names(TRITONBACKEND_Request* request) {
  uint32_t count = 0;
  check(TRITONBACKEND_RequestInputCount(request, &count), "TRITONBACKEND_RequestInputCount");
  rust::Vec<rust::String> names;
  for (uint32_t i = 0; i < count; ++i) {
    const char* name = nullptr;
    check(TRITONBACKEND_RequestInputName(request, i, &name), "TRITONBACKEND_RequestInputName");
    names.push_back(rust::String(name == nullptr ? "" : name));
  }
  return names;
}

rust::Vec<RequestParameter> request_parameters(TRITONBACKEND_Request* request) {
  uint32_t count = 0;
  check(TRITONBACKEND_RequestParameterCount(request, &count), "TRITONBACKEND_RequestParameterCount");
  rust::Vec<RequestParameter> params;
  for (uint32_t i = 0; i < count; ++i) {
    const char* key = nullptr;
    TRITONSERVER_ParameterType type = TRITONSERVER_PARAMETER_STRING;
    const void* value = nullptr;
    check(
        TRITONBACKEND_RequestParameter(request, i, &key, &type, &value),
        "TRITONBACKEND_RequestParameter");
    RequestParameter p{};
    p.key = rust::String::lossy(key == nullptr ? "" : key);
    p.kind = static_cast<uint32_t>(type);
    // The value points at the parameter's own storage: a C string, an int64_t, a bool or a double.
    // A BYTES value comes without its size, so only its type is passed on.
    if (value != nullptr) {
      switch (type) {
        case TRITONSERVER_PARAMETER_STRING:
          p.text = rust::String::lossy(static_cast<const char*>(value));
          break;
        case TRITONSERVER_PARAMETER_INT:
          p.int_value = *static_cast<const int64_t*>(value);
          break;
        case TRITONSERVER_PARAMETER_BOOL:
          p.bool_value = *static_cast<const bool*>(value);
          break;
        case TRITONSERVER_PARAMETER_DOUBLE:
          p.double_value = *static_cast<const double*>(value);
          break;
        default:
          break;
      }
    }
    params.push_back(std::move(p));
  }
  return params;
}

bool request_input(
    TRITONBACKEND_Request* request, rust::Str name, uint32_t& datatype,
    rust::Vec<int64_t>& shape, rust::Vec<uint8_t>& data) {
  std::string n = to_std(name);
  TRITONBACKEND_Input* input = nullptr;
  TRITONSERVER_Error* err = TRITONBACKEND_RequestInput(request, n.c_str(), &input);
  if (err != nullptr) {
    // Absent input: Triton reports NOT_FOUND / INVALID_ARG; the caller decides if it is required.
    TRITONSERVER_ErrorDelete(err);
    return false;
  }
  TRITONSERVER_DataType dt;
  const int64_t* dims = nullptr;
  uint32_t dims_count = 0;
  uint64_t byte_size = 0;
  uint32_t buffer_count = 0;
  check(
      TRITONBACKEND_InputProperties(
          input, nullptr, &dt, &dims, &dims_count, &byte_size, &buffer_count),
      "TRITONBACKEND_InputProperties");
  datatype = static_cast<uint32_t>(dt);
  shape.clear();
  for (uint32_t i = 0; i < dims_count; ++i) {
    shape.push_back(dims[i]);
  }
  data.clear();
  data.reserve(byte_size);
  for (uint32_t b = 0; b < buffer_count; ++b) {
    const void* buf = nullptr;
    uint64_t size = 0;
    TRITONSERVER_MemoryType mem = TRITONSERVER_MEMORY_CPU;
    int64_t mem_id = 0;
    check(
        TRITONBACKEND_InputBuffer(input, b, &buf, &size, &mem, &mem_id),
        "TRITONBACKEND_InputBuffer");
    if (mem == TRITONSERVER_MEMORY_GPU) {
      throw std::runtime_error("input " + n + " is in GPU memory; pregate reads inputs from CPU memory");
    }
    const uint8_t* p = static_cast<const uint8_t*>(buf);
    for (uint64_t i = 0; i < size; ++i) {
      data.push_back(p[i]);
    }
  }
  return true;
}

void request_release(TRITONBACKEND_Request* request) {
  check(
      TRITONBACKEND_RequestRelease(request, TRITONSERVER_REQUEST_RELEASE_ALL),
      "TRITONBACKEND_RequestRelease");
}

TRITONBACKEND_ResponseFactory* factory_new(TRITONBACKEND_Request* request) {
  TRITONBACKEND_ResponseFactory* f = nullptr;
  check(TRITONBACKEND_ResponseFactoryNew(&f, request), "TRITONBACKEND_ResponseFactoryNew");
  return f;
}

void factory_delete(TRITONBACKEND_ResponseFactory* factory) {
  check(TRITONBACKEND_ResponseFactoryDelete(factory), "TRITONBACKEND_ResponseFactoryDelete");
}

bool factory_is_cancelled(TRITONBACKEND_ResponseFactory* factory) {
  bool cancelled = false;
  check(
      TRITONBACKEND_ResponseFactoryIsCancelled(factory, &cancelled),
      "TRITONBACKEND_ResponseFactoryIsCancelled");
  return cancelled;
}

void factory_send_final(TRITONBACKEND_ResponseFactory* factory) {
  check(
      TRITONBACKEND_ResponseFactorySendFlags(factory, TRITONSERVER_RESPONSE_COMPLETE_FINAL),
      "TRITONBACKEND_ResponseFactorySendFlags");
}

namespace {

// Adds one output tensor to `response` and copies `bytes` into its (CPU) buffer.
void add_output(
    TRITONBACKEND_Response* response, const char* name, TRITONSERVER_DataType dt,
    int64_t dim, const uint8_t* bytes, size_t size) {
  TRITONBACKEND_Output* out = nullptr;
  check(TRITONBACKEND_ResponseOutput(response, &out, name, dt, &dim, 1), "TRITONBACKEND_ResponseOutput");
  void* buf = nullptr;
  TRITONSERVER_MemoryType mem = TRITONSERVER_MEMORY_CPU;
  int64_t mem_id = 0;
  check(TRITONBACKEND_OutputBuffer(out, &buf, size, &mem, &mem_id), "TRITONBACKEND_OutputBuffer");
  if (size > 0 && mem == TRITONSERVER_MEMORY_GPU) {
    throw std::runtime_error(std::string("output ") + name + " was given GPU memory");
  }
  if (size > 0) {
    std::memcpy(buf, bytes, size);
  }
}

}  // namespace

void send_tokens(
    TRITONBACKEND_ResponseFactory* factory, rust::Slice<const uint8_t> text,
    rust::Slice<const int32_t> ids, bool final_response) {
  TRITONBACKEND_Response* response = nullptr;
  check(TRITONBACKEND_ResponseNewFromFactory(&response, factory), "TRITONBACKEND_ResponseNewFromFactory");
  try {
    // BYTES tensors: each element is a 4-byte little-endian length, then the bytes.
    std::vector<uint8_t> elem(4 + text.size());
    uint32_t len = static_cast<uint32_t>(text.size());
    std::memcpy(elem.data(), &len, 4);
    if (text.size() > 0) {
      std::memcpy(elem.data() + 4, text.data(), text.size());
    }
    add_output(response, "text_output", TRITONSERVER_TYPE_BYTES, 1, elem.data(), elem.size());
    add_output(
        response, "output_ids", TRITONSERVER_TYPE_INT32, static_cast<int64_t>(ids.size()),
        reinterpret_cast<const uint8_t*>(ids.data()), ids.size() * sizeof(int32_t));
  } catch (...) {
    TRITONBACKEND_ResponseDelete(response);
    throw;
  }
  check(
      TRITONBACKEND_ResponseSend(
          response, final_response ? TRITONSERVER_RESPONSE_COMPLETE_FINAL : 0, nullptr),
      "TRITONBACKEND_ResponseSend");
}

void send_error(TRITONBACKEND_ResponseFactory* factory, uint32_t code, rust::Str msg) {
  TRITONBACKEND_Response* response = nullptr;
  check(TRITONBACKEND_ResponseNewFromFactory(&response, factory), "TRITONBACKEND_ResponseNewFromFactory");
  std::string m = to_std(msg);
  TRITONSERVER_Error* err =
      TRITONSERVER_ErrorNew(static_cast<TRITONSERVER_Error_Code>(code), m.c_str());
  TRITONSERVER_Error* sent =
      TRITONBACKEND_ResponseSend(response, TRITONSERVER_RESPONSE_COMPLETE_FINAL, err);
  // Triton copies the error's status; the caller keeps ownership of `err`.
  TRITONSERVER_ErrorDelete(err);
  check(sent, "TRITONBACKEND_ResponseSend");
}

TRITONSERVER_MetricFamily* metric_family_new(
    uint32_t kind, rust::Str name, rust::Str description) {
  std::string n = to_std(name);
  std::string d = to_std(description);
  TRITONSERVER_MetricFamily* family = nullptr;
  check(
      TRITONSERVER_MetricFamilyNew(
          &family, static_cast<TRITONSERVER_MetricKind>(kind), n.c_str(), d.c_str()),
      "TRITONSERVER_MetricFamilyNew");
  return family;
}

void metric_family_delete(TRITONSERVER_MetricFamily* family) {
  check(TRITONSERVER_MetricFamilyDelete(family), "TRITONSERVER_MetricFamilyDelete");
}

TRITONSERVER_Metric* metric_new(
    TRITONSERVER_MetricFamily* family, rust::Slice<const rust::String> labels) {
  // `labels` is flat: key, value, key, value...
  std::vector<const TRITONSERVER_Parameter*> params;
  std::vector<std::string> values;
  values.reserve(labels.size());
  for (const auto& l : labels) {
    values.emplace_back(std::string(l));
  }
  for (size_t i = 0; i + 1 < values.size(); i += 2) {
    params.push_back(TRITONSERVER_ParameterNew(
        values[i].c_str(), TRITONSERVER_PARAMETER_STRING, values[i + 1].c_str()));
  }
  TRITONSERVER_Metric* metric = nullptr;
  TRITONSERVER_Error* err =
      TRITONSERVER_MetricNew(&metric, family, params.data(), params.size());
  for (const auto* p : params) {
    TRITONSERVER_ParameterDelete(const_cast<TRITONSERVER_Parameter*>(p));
  }
  check(err, "TRITONSERVER_MetricNew");
  return metric;
}

void metric_delete(TRITONSERVER_Metric* metric) {
  check(TRITONSERVER_MetricDelete(metric), "TRITONSERVER_MetricDelete");
}

void metric_set(TRITONSERVER_Metric* metric, double value) {
  check(TRITONSERVER_MetricSet(metric, value), "TRITONSERVER_MetricSet");
}

void metric_increment(TRITONSERVER_Metric* metric, double value) {
  check(TRITONSERVER_MetricIncrement(metric, value), "TRITONSERVER_MetricIncrement");
}

}  // namespace pregate_triton
