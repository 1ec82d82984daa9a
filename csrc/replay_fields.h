// The replay buffer's fields, written and gathered in the core (included by bindings.cpp
// only; python/isample/integrations/_replay_fields.py holds the same fields for every other
// path).
//
// A field is a C-contiguous CPU tensor of shape (capacity, *item_shape). Writing one item
// takes, per field, a Python number (bool, int, float), a numpy array or scalar, or a CPU
// torch tensor of exactly the item's shape, whose type the Python layer listed as needing no
// check for that field (FieldStorage's _Spec: a safe cast, no range check), and converts it
// with C's conversions, which are numpy's and torch's casts. Anything else is "not plain":
// nothing is written and the Python layer takes its own path, which stores the same bits or
// raises the usual clear error. So this changes no behaviour, only the cost: one call
// instead of a few Python statements per field.
#pragma once

#include <Python.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "python_arrays.h"

namespace isample {

// The element types a field may have here (float16, bfloat16 and complex fields take the
// Python path).
enum class Scalar : uint8_t { kBool, kInt8, kInt16, kInt32, kInt64, kUInt8, kUInt16, kUInt32, kUInt64, kFloat32, kFloat64, kOther };

inline Scalar scalar_named(const std::string& name) {  // numpy's dtype names
  static const char* const names[] = {"bool",   "int8",   "int16",  "int32",   "int64",  "uint8",
                                      "uint16", "uint32", "uint64", "float32", "float64"};
  for (int s = 0; s < int(Scalar::kOther); ++s) {
    if (name == names[s]) return Scalar(s);
  }
  return Scalar::kOther;
}

inline Scalar scalar_of(const dlpack::DataType& t) {
  if (t.lanes != 1) return Scalar::kOther;
  constexpr uint8_t kDLBool = 6;
  switch (t.code) {
    case dlpack::kInt:
      return t.bits == 8 ? Scalar::kInt8 : t.bits == 16 ? Scalar::kInt16 : t.bits == 32 ? Scalar::kInt32
             : t.bits == 64 ? Scalar::kInt64 : Scalar::kOther;
    case 1:  // kDLUInt
      return t.bits == 8 ? Scalar::kUInt8 : t.bits == 16 ? Scalar::kUInt16 : t.bits == 32 ? Scalar::kUInt32
             : t.bits == 64 ? Scalar::kUInt64 : Scalar::kOther;
    case dlpack::kFloat:
      return t.bits == 32 ? Scalar::kFloat32 : t.bits == 64 ? Scalar::kFloat64 : Scalar::kOther;
    case kDLBool:
      return t.bits == 8 ? Scalar::kBool : Scalar::kOther;
    default:
      return Scalar::kOther;
  }
}

// A buffer-protocol format in native byte order ("f", "<d", "=q", ...) of `itemsize` bytes.
inline Scalar scalar_of(const char* format, Py_ssize_t itemsize) {
  if (format == nullptr) return Scalar::kOther;
  const bool little = __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__;
  if (format[0] == '=' || format[0] == '@' || (little && format[0] == '<')) ++format;
  if (format[0] == '\0' || format[1] != '\0') return Scalar::kOther;
  const bool is_signed = format[0] == 'b' || format[0] == 'h' || format[0] == 'i' || format[0] == 'l' || format[0] == 'q';
  const bool is_unsigned = format[0] == 'B' || format[0] == 'H' || format[0] == 'I' || format[0] == 'L' || format[0] == 'Q';
  if (is_signed || is_unsigned) {
    const Scalar base = is_signed ? Scalar::kInt8 : Scalar::kUInt8;
    const int step = itemsize == 1 ? 0 : itemsize == 2 ? 1 : itemsize == 4 ? 2 : itemsize == 8 ? 3 : -1;
    return step < 0 ? Scalar::kOther : Scalar(int(base) + step);
  }
  if (format[0] == '?' && itemsize == 1) return Scalar::kBool;
  if (format[0] == 'f' && itemsize == 4) return Scalar::kFloat32;
  if (format[0] == 'd' && itemsize == 8) return Scalar::kFloat64;
  return Scalar::kOther;
}

namespace replay_detail {

template <Scalar S> struct CType;
template <> struct CType<Scalar::kBool> { using type = uint8_t; };  // read as bytes: 0 or 1
template <> struct CType<Scalar::kInt8> { using type = int8_t; };
template <> struct CType<Scalar::kInt16> { using type = int16_t; };
template <> struct CType<Scalar::kInt32> { using type = int32_t; };
template <> struct CType<Scalar::kInt64> { using type = int64_t; };
template <> struct CType<Scalar::kUInt8> { using type = uint8_t; };
template <> struct CType<Scalar::kUInt16> { using type = uint16_t; };
template <> struct CType<Scalar::kUInt32> { using type = uint32_t; };
template <> struct CType<Scalar::kUInt64> { using type = uint64_t; };
template <> struct CType<Scalar::kFloat32> { using type = float; };
template <> struct CType<Scalar::kFloat64> { using type = double; };

template <Scalar From, Scalar To>
void convert(const void* from, void* to, int64_t count) {
  using F = typename CType<From>::type;
  using T = typename CType<To>::type;
  const F* source = static_cast<const F*>(from);
  T* target = static_cast<T*>(to);
  for (int64_t j = 0; j < count; ++j) {
    if (To == Scalar::kBool) {
      target[j] = T(source[j] != F(0));
    } else {
      target[j] = static_cast<T>(source[j]);
    }
  }
}

template <Scalar From>
void convert_from(const void* from, Scalar to, void* target, int64_t count) {
  switch (to) {
    case Scalar::kBool: return convert<From, Scalar::kBool>(from, target, count);
    case Scalar::kInt8: return convert<From, Scalar::kInt8>(from, target, count);
    case Scalar::kInt16: return convert<From, Scalar::kInt16>(from, target, count);
    case Scalar::kInt32: return convert<From, Scalar::kInt32>(from, target, count);
    case Scalar::kInt64: return convert<From, Scalar::kInt64>(from, target, count);
    case Scalar::kUInt8: return convert<From, Scalar::kUInt8>(from, target, count);
    case Scalar::kUInt16: return convert<From, Scalar::kUInt16>(from, target, count);
    case Scalar::kUInt32: return convert<From, Scalar::kUInt32>(from, target, count);
    case Scalar::kUInt64: return convert<From, Scalar::kUInt64>(from, target, count);
    case Scalar::kFloat32: return convert<From, Scalar::kFloat32>(from, target, count);
    case Scalar::kFloat64: return convert<From, Scalar::kFloat64>(from, target, count);
    case Scalar::kOther: return;
  }
}

// `count` elements of type `from` at `source` into `target` of type `to`, with C's
// conversions (the caller has made sure each one is a safe cast).
inline void convert_any(Scalar from, const void* source, Scalar to, void* target, int64_t count) {
  switch (from) {
    case Scalar::kBool: return convert_from<Scalar::kBool>(source, to, target, count);
    case Scalar::kInt8: return convert_from<Scalar::kInt8>(source, to, target, count);
    case Scalar::kInt16: return convert_from<Scalar::kInt16>(source, to, target, count);
    case Scalar::kInt32: return convert_from<Scalar::kInt32>(source, to, target, count);
    case Scalar::kInt64: return convert_from<Scalar::kInt64>(source, to, target, count);
    case Scalar::kUInt8: return convert_from<Scalar::kUInt8>(source, to, target, count);
    case Scalar::kUInt16: return convert_from<Scalar::kUInt16>(source, to, target, count);
    case Scalar::kUInt32: return convert_from<Scalar::kUInt32>(source, to, target, count);
    case Scalar::kUInt64: return convert_from<Scalar::kUInt64>(source, to, target, count);
    case Scalar::kFloat32: return convert_from<Scalar::kFloat32>(source, to, target, count);
    case Scalar::kFloat64: return convert_from<Scalar::kFloat64>(source, to, target, count);
    case Scalar::kOther: return;
  }
}

// Rows of `row_bytes` at `index` from `source` into `target`, one after another.
inline void gather_rows(const char* source, size_t row_bytes, const int64_t* index, int64_t k, char* target) {
  switch (row_bytes) {  // the common small rows as fixed-size moves
    case 4:
      for (int64_t j = 0; j < k; ++j) std::memcpy(target + 4 * j, source + 4 * index[j], 4);
      return;
    case 8:
      for (int64_t j = 0; j < k; ++j) std::memcpy(target + 8 * j, source + 8 * index[j], 8);
      return;
    case 16:
      for (int64_t j = 0; j < k; ++j) std::memcpy(target + 16 * j, source + 16 * index[j], 16);
      return;
    default:
      for (int64_t j = 0; j < k; ++j) std::memcpy(target + row_bytes * size_t(j), source + row_bytes * size_t(index[j]), row_bytes);
  }
}

}  // namespace replay_detail

// One field's value for one item, checked and ready to write: `count` elements of `type`
// at `data` (which points into the caller's object, or at `number` for a Python number).
struct ReadyValue {
  const void* data = nullptr;
  Scalar type = Scalar::kOther;
  union {
    uint8_t flag;
    int64_t integer;
    double real;
  } number;
};

class ReplayFields {
 public:
  // Python numbers a field takes as they are (FieldStorage's _Spec.python_ok).
  enum PythonKinds : unsigned { kPythonBool = 1, kPythonInt = 2, kPythonFloat = 4 };

  struct Field {
    PyObject* name = nullptr;     // a str (owned)
    PyObject* storage = nullptr;  // the tensor (owned: keeps `data` alive)
    char* data = nullptr;
    int64_t rows = 0;
    size_t row_bytes = 0;
    Scalar type = Scalar::kOther;
    int64_t count = 1;  // elements per item
    std::vector<int64_t> shape;  // (rows, *item_shape)
    dlpack::DataType dtype{};
    uint32_t sources = 0;  // bit s: a numpy or torch value of Scalar s needs no check
    unsigned python = 0;   // PythonKinds
  };

  ReplayFields(const PythonArrays& arrays, PyObject* generic_type) : arrays_(arrays), generic_(generic_type) {
    Py_XINCREF(generic_);
  }
  ~ReplayFields() {
    for (Field& f : fields_) {
      Py_XDECREF(f.name);
      Py_XDECREF(f.storage);
    }
    Py_XDECREF(generic_);
  }
  ReplayFields(const ReplayFields&) = delete;
  ReplayFields& operator=(const ReplayFields&) = delete;

  // Add a field: its name, its storage (a C-contiguous CPU tensor of a supported dtype,
  // else std::invalid_argument), the numpy dtype names it takes unchecked, and PythonKinds.
  void add(PyObject* name, PyObject* storage, const std::vector<std::string>& sources, unsigned python) {
    Field f;
    const void* data = nullptr;
    dlpack::Tensor t;
    if (!PyUnicode_CheckExact(name) || !arrays_.rows(storage, data, f.rows, f.row_bytes, t)) {
      throw std::invalid_argument("a replay field must be a str name and a C-contiguous CPU tensor with a leading dimension");
    }
    f.type = scalar_of(t.dtype);
    if (f.type == Scalar::kOther) throw std::invalid_argument("unsupported field dtype");
    f.data = static_cast<char*>(const_cast<void*>(data));
    f.shape.assign(t.shape, t.shape + t.ndim);
    f.dtype = t.dtype;
    for (int32_t d = 1; d < t.ndim; ++d) f.count *= t.shape[d];
    for (const std::string& s : sources) {
      const Scalar type = scalar_named(s);
      if (type != Scalar::kOther) f.sources |= 1u << unsigned(type);
    }
    f.python = python;
    Py_INCREF(name);
    Py_INCREF(storage);
    f.name = name;
    f.storage = storage;
    fields_.push_back(std::move(f));
  }

  size_t size() const { return fields_.size(); }
  const Field& field(size_t i) const { return fields_[i]; }

  // Check one item's values (a dict: name -> value, exactly the fields) into `ready`; false
  // (no Python error set) when any is not plain.
  bool prepare(PyObject* values, std::vector<ReadyValue>& ready) const {
    if (!PyDict_CheckExact(values) || size_t(PyDict_GET_SIZE(values)) != fields_.size()) return false;
    ready.resize(fields_.size());
    for (size_t i = 0; i < fields_.size(); ++i) {
      PyObject* value = PyDict_GetItemWithError(values, fields_[i].name);  // borrowed
      if (value == nullptr) {
        PyErr_Clear();
        return false;
      }
      if (!prepare_value(fields_[i], value, ready[i])) return false;
    }
    return true;
  }

  // Write `prepare`'s values into `slot` (< rows): cannot fail.
  void write(int64_t slot, const std::vector<ReadyValue>& ready) const {
    for (size_t i = 0; i < fields_.size(); ++i) {
      const Field& f = fields_[i];
      char* row = f.data + size_t(slot) * f.row_bytes;
      if (ready[i].type == f.type) {
        std::memcpy(row, ready[i].data, f.row_bytes);
      } else {
        replay_detail::convert_any(ready[i].type, ready[i].data, f.type, row, f.count);
      }
    }
  }

  // New tensors (k, *item_shape), one per field, into `out` (Python error set on failure).
  bool allocate_rows(int64_t k, std::vector<PyObject*>& out, std::vector<char*>& data) const {
    out.assign(fields_.size(), nullptr);
    data.assign(fields_.size(), nullptr);
    for (size_t i = 0; i < fields_.size(); ++i) {
      std::vector<int64_t> dims = fields_[i].shape;
      dims[0] = k;
      void* memory = nullptr;
      out[i] = arrays_.new_tensor(fields_[i].dtype, int32_t(dims.size()), dims.data(), memory);
      if (out[i] == nullptr) {
        for (size_t j = 0; j < i; ++j) Py_DECREF(out[j]);
        return false;
      }
      data[i] = static_cast<char*>(memory);
    }
    return true;
  }

  // Each field's rows at `index` (every index < rows) into `data` from allocate_rows.
  void gather(const int64_t* index, int64_t k, const std::vector<char*>& data) const {
    for (size_t i = 0; i < fields_.size(); ++i) {
      replay_detail::gather_rows(fields_[i].data, fields_[i].row_bytes, index, k, data[i]);
    }
  }

 private:
  bool prepare_value(const Field& f, PyObject* value, ReadyValue& ready) const {
    PyTypeObject* type = Py_TYPE(value);
    const bool scalar_item = f.count == 1 && f.shape.size() == 1;
    if (type == &PyFloat_Type || type == &PyLong_Type || type == &PyBool_Type) {
      if (!scalar_item) return false;
      if (type == &PyBool_Type) {
        if (!(f.python & kPythonBool)) return false;
        ready.number.flag = value == Py_True ? 1 : 0;
        ready.type = Scalar::kBool;
      } else if (type == &PyFloat_Type) {
        if (!(f.python & kPythonFloat)) return false;
        ready.number.real = PyFloat_AS_DOUBLE(value);
        ready.type = Scalar::kFloat64;
      } else {
        if (!(f.python & kPythonInt)) return false;
        int overflow = 0;
        const long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (overflow != 0 || (v == -1 && PyErr_Occurred())) {
          PyErr_Clear();
          return false;
        }
        // into a float field only where int -> float64 is exact (one rounding, as numpy's)
        const bool real = f.type == Scalar::kFloat32 || f.type == Scalar::kFloat64;
        if (real && (v > (1LL << 53) || v < -(1LL << 53))) return false;
        ready.number.integer = v;
        ready.type = Scalar::kInt64;
      }
      ready.data = &ready.number;
      return true;
    }
    if (arrays_.is_tensor(value)) {
      dlpack::Tensor t;
      const void* data = nullptr;
      if (!arrays_.compact(value, data, t) || !same_item_shape(f, t.ndim, t.shape)) return false;
      ready.type = scalar_of(t.dtype);
      ready.data = data;
      return accepts(f, ready.type);
    }
    if (arrays_.is_array(value) || (generic_ != nullptr && PyObject_TypeCheck(value, reinterpret_cast<PyTypeObject*>(generic_)))) {
      Py_buffer buffer;
      if (PyObject_GetBuffer(value, &buffer, PyBUF_RECORDS_RO) != 0) {
        PyErr_Clear();
        return false;
      }
      bool plain = same_item_shape(f, buffer.ndim, buffer.shape);
      if (plain && buffer.strides != nullptr) {  // C-contiguous, ignoring dimensions of one element
        Py_ssize_t expected = buffer.itemsize;
        for (int d = buffer.ndim - 1; d >= 0; --d) {
          if (buffer.shape[d] != 1 && buffer.strides[d] != expected) plain = false;
          expected *= buffer.shape[d];
        }
      }
      ready.type = scalar_of(buffer.format, buffer.itemsize);
      ready.data = buffer.buf;
      PyBuffer_Release(&buffer);  // the memory stays: the caller's dict holds the object
      return plain && accepts(f, ready.type);
    }
    return false;
  }

  template <class Dim>
  static bool same_item_shape(const Field& f, int ndim, const Dim* shape) {
    if (size_t(ndim) + 1 != f.shape.size()) return false;
    for (int d = 0; d < ndim; ++d) {
      if (int64_t(shape[d]) != f.shape[size_t(d) + 1]) return false;
    }
    return true;
  }

  static bool accepts(const Field& f, Scalar type) {
    return type != Scalar::kOther && (f.sources >> unsigned(type) & 1u) != 0;
  }

  const PythonArrays& arrays_;
  PyObject* generic_;  // numpy.generic: numpy scalars
  std::vector<Field> fields_;
};

}  // namespace isample
