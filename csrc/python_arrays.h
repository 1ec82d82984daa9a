// Reading torch tensors and numpy arrays straight from their Python objects, and making
// torch tensors for results, without linking against torch or numpy (included by
// bindings.cpp only).
//
// A 128-item call of the trees does about 1 us of C++ work; finding a tensor's address,
// dtype, shape and device through Python attributes cost as much again. Here:
//   * torch tensors are read through DLPack's C exchange API (`__dlpack_c_exchange_api__`
//     on the tensor type: DLPack >= 1.3, torch >= 2.10): one C call fills a DLTensor
//     (about 60 ns), no torch symbol or header is needed, and the ABI is DLPack's, stable
//     across torch releases. New tensors wrap memory allocated here (the same API).
//   * numpy arrays are read through the buffer protocol.
// Anything else, or anything unusual (another device, a view with strides, a tensor
// subclass, a lazily negated tensor), is "not plain": the caller then takes the general
// Python path, which converts it or raises the usual clear error. So these fast paths
// change no behaviour, only the cost.
#pragma once

#include <Python.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace isample {

// -- DLPack 1.3's exchange API: only the declarations used here (dlpack/dlpack.h) --------------
namespace dlpack {
struct Version {
  uint32_t major, minor;
};
struct Device {
  int32_t device_type;  // 1: kDLCPU
  int32_t device_id;
};
struct DataType {
  uint8_t code;  // 0: int, 1: uint, 2: float
  uint8_t bits;
  uint16_t lanes;
};
struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; NULL: compact row-major
  uint64_t byte_offset;
};
struct ManagedTensorVersioned {
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned* self);
  uint64_t flags;
  Tensor dl_tensor;
};
struct ExchangeApiHeader {
  Version version;
  ExchangeApiHeader* prev_api;
};
struct ExchangeApi {
  ExchangeApiHeader header;
  int (*managed_tensor_allocator)(Tensor* prototype, ManagedTensorVersioned** out, void* error_ctx,
                                  void (*set_error)(void* error_ctx, const char* kind, const char* message));
  int (*managed_tensor_from_py_object_no_sync)(void* py_object, ManagedTensorVersioned** out);
  int (*managed_tensor_to_py_object_no_sync)(ManagedTensorVersioned* tensor, void** out_py_object);
  int (*dltensor_from_py_object_no_sync)(void* py_object, Tensor* out);
  int (*current_work_stream)(int32_t device_type, int32_t device_id, void** out_current_stream);
};
constexpr int32_t kCpu = 1;
constexpr uint8_t kInt = 0, kFloat = 2;
}  // namespace dlpack

enum class ElementType { kInt64, kFloat64, kFloat32, kOther };

// A contiguous 1-D CPU array: its address, length and element type.
struct ArrayView {
  const void* data = nullptr;
  int64_t length = 0;
  ElementType type = ElementType::kOther;
};

class PythonArrays {
 public:
  // Learn the tensor type (torch.Tensor) and the array type (numpy.ndarray). Either may be
  // null; a tensor type without a usable exchange API leaves tensors to the general path.
  void configure(PyObject* tensor_type, PyObject* array_type) {
    tensor_type_ = nullptr;
    api_ = nullptr;
    array_type_ = array_type != nullptr && PyType_Check(array_type) ? reinterpret_cast<PyTypeObject*>(array_type) : nullptr;
    if (tensor_type == nullptr || !PyType_Check(tensor_type)) return;
    PyObject* capsule = PyObject_GetAttrString(tensor_type, "__dlpack_c_exchange_api__");
    if (capsule == nullptr) {
      PyErr_Clear();
      return;
    }
    const dlpack::ExchangeApiHeader* header = nullptr;
    if (PyCapsule_CheckExact(capsule)) {
      header = static_cast<const dlpack::ExchangeApiHeader*>(PyCapsule_GetPointer(capsule, "dlpack_exchange_api"));
      if (header == nullptr) PyErr_Clear();
    }
    Py_DECREF(capsule);  // the table lives as long as the process (DLPack's rule)
    // Walk to an API of major version 1, minor >= 3 (the layout declared above).
    while (header != nullptr && !(header->version.major == 1 && header->version.minor >= 3)) header = header->prev_api;
    if (header == nullptr) return;
    const auto* api = reinterpret_cast<const dlpack::ExchangeApi*>(header);
    if (api->dltensor_from_py_object_no_sync == nullptr || api->managed_tensor_to_py_object_no_sync == nullptr) {
      return;
    }
    Py_INCREF(tensor_type);  // kept for the process's lifetime, as the module is
    tensor_type_ = reinterpret_cast<PyTypeObject*>(tensor_type);
    is_neg_ = PyUnicode_InternFromString("is_neg");
    is_neg_function_ = no_argument_method(tensor_type, "is_neg");
    api_ = api;
  }

  // The dtype objects for float64 and float32 results, and the CPU device object: the fast
  // paths take these (by identity), or None, and leave anything else to the general path.
  void configure_names(PyObject* float64, PyObject* float32, PyObject* cpu) {
    for (PyObject** slot : {&float64_, &float32_, &cpu_, &device_type_}) {
      Py_XDECREF(*slot);
      *slot = nullptr;
    }
    if (float64 != Py_None) float64_ = (Py_INCREF(float64), float64);
    if (float32 != Py_None) float32_ = (Py_INCREF(float32), float32);
    if (cpu != Py_None) {
      cpu_ = (Py_INCREF(cpu), cpu);
      device_type_ = reinterpret_cast<PyObject*>(Py_TYPE(cpu));
      Py_INCREF(device_type_);
    }
  }

  // kFloat64 for None or float64, kFloat32 for float32, kOther for anything else.
  ElementType float_dtype(PyObject* dtype) const {
    if (dtype == Py_None || (dtype == float64_ && dtype != nullptr)) return ElementType::kFloat64;
    if (dtype == float32_ && dtype != nullptr) return ElementType::kFloat32;
    return ElementType::kOther;
  }

  // None, the CPU device object, or another device object of the same type whose type is "cpu".
  bool cpu_device(PyObject* device) const {
    if (device == Py_None || (device == cpu_ && cpu_ != nullptr)) return true;
    if (device_type_ == nullptr || reinterpret_cast<PyObject*>(Py_TYPE(device)) != device_type_) return false;
    PyObject* equal = PyObject_RichCompare(device, cpu_, Py_EQ);
    if (equal == nullptr) {
      PyErr_Clear();
      return false;
    }
    const bool same = equal == Py_True;
    Py_DECREF(equal);
    return same;
  }

  bool makes_tensors() const { return api_ != nullptr; }

  // Fill `view` when `object` is a plain array: a torch.Tensor (exactly that type) or a
  // numpy.ndarray on the CPU, 1-D, contiguous, of int64, float64 or float32. Returns false
  // otherwise, with no Python error set.
  bool view(PyObject* object, ArrayView& view) const {
    PyTypeObject* type = Py_TYPE(object);
    if (type == tensor_type_) return view_tensor(object, view);
    if (type == array_type_) return view_buffer(object, view);
    return false;
  }

  // A new 1-D CPU torch tensor of `length` elements (int64 or float64 / float32), and in
  // `data` its memory. Returns null (with the Python error set) on failure. The memory is
  // ours: one 64-byte-aligned block holding the DLPack header, the shape and the data, which
  // torch frees through the header's deleter when the tensor goes. Wrapping it takes half
  // the time of torch's own allocation through the exchange API (0.4 against 0.7 us).
  PyObject* new_tensor(int64_t length, ElementType type, void*& data) const {
    const dlpack::DataType dtype = type == ElementType::kInt64     ? dlpack::DataType{dlpack::kInt, 64, 1}
                                   : type == ElementType::kFloat32 ? dlpack::DataType{dlpack::kFloat, 32, 1}
                                                                   : dlpack::DataType{dlpack::kFloat, 64, 1};
    return new_tensor(dtype, 1, &length, data);
  }

  // The same for any shape (ndim >= 1) and element type: a C-contiguous CPU tensor.
  PyObject* new_tensor(const dlpack::DataType& dtype, int32_t ndim, const int64_t* dims, void*& data) const {
    size_t count = 1;
    const size_t item = (size_t(dtype.bits) * dtype.lanes + 7) / 8;
    for (int32_t d = 0; d < ndim; ++d) {
      if (dims[d] < 0 || (dims[d] > 0 && count > (SIZE_MAX / 4) / size_t(dims[d]))) {
        PyErr_SetString(PyExc_MemoryError, "tensor too large");
        return nullptr;
      }
      count *= size_t(dims[d]);
    }
    const size_t head = round_up(sizeof(dlpack::ManagedTensorVersioned) + sizeof(int64_t) * size_t(ndim));
    if (item != 0 && count > (SIZE_MAX / 4) / item) {
      PyErr_SetString(PyExc_MemoryError, "tensor too large");
      return nullptr;
    }
    char* block = static_cast<char*>(std::aligned_alloc(64, head + round_up(count * item)));
    if (block == nullptr) {
      PyErr_NoMemory();
      return nullptr;
    }
    auto* managed = reinterpret_cast<dlpack::ManagedTensorVersioned*>(block);
    int64_t* shape = reinterpret_cast<int64_t*>(block + sizeof(dlpack::ManagedTensorVersioned));
    for (int32_t d = 0; d < ndim; ++d) shape[d] = dims[d];
    managed->version = api_->header.version;
    managed->manager_ctx = nullptr;
    managed->deleter = [](dlpack::ManagedTensorVersioned* self) { std::free(self); };
    managed->flags = 0;
    dlpack::Tensor& t = managed->dl_tensor;
    t.data = block + head;
    t.device = {dlpack::kCpu, 0};
    t.ndim = ndim;
    t.dtype = dtype;
    t.shape = shape;
    t.strides = nullptr;
    t.byte_offset = 0;
    data = t.data;
    void* tensor = nullptr;
    if (api_->managed_tensor_to_py_object_no_sync(managed, &tensor) != 0) return nullptr;  // it took `managed`
    return static_cast<PyObject*>(tensor);
  }

  // A C-contiguous CPU torch tensor (exactly that type) of any shape (ndim >= 1) and any
  // element type but complex: its address, rows (shape[0]), bytes per row and DLPack
  // description. False for anything else (no Python error set).
  bool rows(PyObject* object, const void*& data, int64_t& count, size_t& row_bytes, dlpack::Tensor& description) const {
    if (!compact(object, data, description) || description.ndim < 1) return false;
    const dlpack::Tensor& t = description;
    size_t row = t.dtype.bits / 8;
    for (int32_t d = 1; d < t.ndim; ++d) row *= size_t(t.shape[d]);
    count = t.shape[0];
    row_bytes = row;
    return true;
  }

  // A C-contiguous CPU torch tensor (exactly that type) of any shape, 0-d included, and any
  // element type but complex: its address (byte offset applied) and DLPack description (whose
  // shape lives as long as the tensor). False for anything else (no Python error set).
  bool compact(PyObject* object, const void*& data, dlpack::Tensor& description) const {
    if (api_ == nullptr || Py_TYPE(object) != tensor_type_) return false;
    dlpack::Tensor& t = description;
    if (api_->dltensor_from_py_object_no_sync(object, &t) != 0) {
      PyErr_Clear();
      return false;
    }
    if (t.device.device_type != dlpack::kCpu || t.ndim < 0 || t.dtype.lanes != 1 || t.dtype.bits % 8 != 0 ||
        t.dtype.code == kComplex) {
      return false;
    }
    if (t.strides != nullptr) {  // row-major and compact, ignoring dimensions of one element
      int64_t expected = 1;
      for (int32_t d = t.ndim - 1; d >= 0; --d) {
        if (t.shape[d] != 1 && t.strides[d] != expected) return false;
        expected *= t.shape[d];
      }
    }
    if (!not_negated(object)) return false;
    data = static_cast<const char*>(t.data) + t.byte_offset;
    return true;
  }

  bool is_tensor(PyObject* object) const { return tensor_type_ != nullptr && Py_TYPE(object) == tensor_type_; }
  bool is_array(PyObject* object) const { return array_type_ != nullptr && Py_TYPE(object) == array_type_; }

 private:
  static size_t round_up(size_t bytes) { return (bytes + 63) / 64 * 64; }
  static constexpr uint8_t kComplex = 5;

  // A lazily negated view (x.conj().imag) holds its values un-negated: DLPack cannot say so,
  // so ask the tensor (the general path resolves it).
  bool not_negated(PyObject* object) const {
    PyObject* negated = is_neg_function_ != nullptr ? is_neg_function_(object, nullptr) : PyObject_CallMethodNoArgs(object, is_neg_);
    if (negated == nullptr) {
      PyErr_Clear();
      return false;
    }
    const bool plain = negated == Py_False;
    Py_DECREF(negated);
    return plain;
  }

  // The C function of a METH_NOARGS method of `type` (a method descriptor), else null. Called
  // directly it skips the attribute lookup and the call protocol: tensor.is_neg() costs
  // about 100 ns that way round, and every array a fast path reads asks it.
  static PyCFunction no_argument_method(PyObject* type, const char* name) {
    PyObject* method = PyObject_GetAttrString(type, name);
    if (method == nullptr) {
      PyErr_Clear();
      return nullptr;
    }
    PyCFunction function = nullptr;
    if (Py_TYPE(method) == &PyMethodDescr_Type) {
      const PyMethodDef* definition = reinterpret_cast<PyMethodDescrObject*>(method)->d_method;
      if (definition != nullptr && definition->ml_flags == METH_NOARGS) function = definition->ml_meth;
    }
    Py_DECREF(method);  // the type keeps its descriptor, and the descriptor its definition
    return function;
  }

  static ElementType element_type(const dlpack::DataType& t) {
    if (t.lanes != 1) return ElementType::kOther;
    if (t.code == dlpack::kInt && t.bits == 64) return ElementType::kInt64;
    if (t.code == dlpack::kFloat && t.bits == 64) return ElementType::kFloat64;
    if (t.code == dlpack::kFloat && t.bits == 32) return ElementType::kFloat32;
    return ElementType::kOther;
  }

  bool view_tensor(PyObject* object, ArrayView& view) const {
    dlpack::Tensor t;
    if (api_->dltensor_from_py_object_no_sync(object, &t) != 0) {
      PyErr_Clear();
      return false;
    }
    if (t.device.device_type != dlpack::kCpu || t.ndim != 1) return false;
    const ElementType type = element_type(t.dtype);
    if (type == ElementType::kOther) return false;
    if (t.strides != nullptr && t.shape[0] > 1 && t.strides[0] != 1) return false;
    if (!not_negated(object)) return false;
    view.data = static_cast<const char*>(t.data) + t.byte_offset;
    view.length = t.shape[0];
    view.type = type;
    return true;
  }

  static bool view_buffer(PyObject* object, ArrayView& view) {
    Py_buffer buffer;
    if (PyObject_GetBuffer(object, &buffer, PyBUF_RECORDS_RO) != 0) {
      PyErr_Clear();
      return false;
    }
    ElementType type = ElementType::kOther;
    const char* format = buffer.format != nullptr ? buffer.format : "B";
    const bool little = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;
    if (format[0] == '=' || format[0] == '@' || (little && format[0] == '<')) ++format;  // native byte order
    if (format[1] == '\0') {
      if ((format[0] == 'l' || format[0] == 'q') && buffer.itemsize == 8) type = ElementType::kInt64;
      if (format[0] == 'd' && buffer.itemsize == 8) type = ElementType::kFloat64;
      if (format[0] == 'f' && buffer.itemsize == 4) type = ElementType::kFloat32;
    }
    const bool plain = type != ElementType::kOther && buffer.ndim == 1 &&
                       (buffer.shape[0] <= 1 || buffer.strides == nullptr || buffer.strides[0] == buffer.itemsize);
    if (plain) {
      view.data = buffer.buf;
      view.length = buffer.shape[0];
      view.type = type;
    }
    PyBuffer_Release(&buffer);  // numpy keeps the memory: the caller holds the array
    return plain;
  }

  PyTypeObject* tensor_type_ = nullptr;
  PyTypeObject* array_type_ = nullptr;
  const dlpack::ExchangeApi* api_ = nullptr;
  PyObject* is_neg_ = nullptr;
  PyCFunction is_neg_function_ = nullptr;  // torch.Tensor.is_neg's C function, where it is METH_NOARGS
  PyObject *float64_ = nullptr, *float32_ = nullptr, *cpu_ = nullptr, *device_type_ = nullptr;
};

}  // namespace isample
