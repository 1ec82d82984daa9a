// The only pybind11 file: exposes the trees as isample._core.
//
// Arrays cross as (address, length): the Python layer (isample/_backend.py) has already
// checked dtype, device, contiguity and length, so no numpy or torch type is needed here
// and one wheel serves every torch version. Values and indices are checked in C++.
//
// Each tree is wrapped in a Handle that serialises calls with a mutex (the GIL is dropped
// for long calls, so two Python threads could otherwise meet inside one tree) and owns the
// tree's random stream: draws with no seed use key_for_call(stream_seed, calls), and calls
// advances only once the draw has succeeded, so a rejected call leaves the stream as it was.
#include <pybind11/pybind11.h>
#include <structmember.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "buffer.h"
#include "cpu_kernels.h"
#include "descend.h"
#include "fastmath.h"
#include "gpu/device_tree_api.h"
#include "python_arrays.h"
#include "replay.h"
#include "replay_fields.h"
#include "scores.h"
#include "softmax_tree.h"
#include "sum_tree.h"

namespace py = pybind11;
using namespace isample;

namespace {

// Calls that touch more items than this release the GIL.
constexpr int64_t kLongCall = 16384;

// The fast paths (*_arrays, sample_tensor, SamplerStep): tensors and arrays read from their
// Python objects (python_arrays.h). Each returns None / False for arguments it does not
// take, having changed nothing, and the Python layer then takes its general path.
PythonArrays arrays;

// Largest draw the fast path makes: above it the Python layer checks memory first.
constexpr int64_t kFastDrawLimit = int64_t(1) << 27;

bool int64_array(py::handle object, ArrayView& view) {
  return arrays.view(object.ptr(), view) && view.type == ElementType::kInt64;
}

bool real_array(py::handle object, int64_t length, ArrayView& view) {
  return arrays.view(object.ptr(), view) && view.length == length &&
         (view.type == ElementType::kFloat64 || view.type == ElementType::kFloat32);
}

// The float64 values of a real array: its own memory, or float32 widened (exactly) into `scratch`.
const double* as_doubles(const ArrayView& view, std::vector<double>& scratch) {
  if (view.type == ElementType::kFloat64) return static_cast<const double*>(view.data);
  scratch.resize(size_t(view.length));
  const float* source = static_cast<const float*>(view.data);
  for (int64_t j = 0; j < view.length; ++j) scratch[j] = double(source[j]);
  return scratch.data();
}

// A Python int as a draw count in [0, limit]; false for anything else.
bool plain_count(py::handle object, int64_t limit, int64_t& k) {
  if (!PyLong_CheckExact(object.ptr())) return false;
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(object.ptr(), &overflow);
  if (overflow != 0 || value < 0 || value > limit) return false;
  k = value;
  return true;
}

// None, or a Python int taken modulo 2^64 (as _backend.check_seed does).
bool plain_seed(py::handle object, std::optional<uint64_t>& seed) {
  if (object.is_none()) return true;
  if (!PyLong_CheckExact(object.ptr())) return false;
  const unsigned long long value = PyLong_AsUnsignedLongLongMask(object.ptr());
  if (value == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  seed = uint64_t(value);
  return true;
}

template <class T>
T* as_pointer(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

template <class Tree>
struct Handle {
  template <class... Args>
  explicit Handle(uint64_t seed, Args&&... args) : tree(std::forward<Args>(args)...), stream_seed(seed) {}

  // Runs f with the tree locked. Never waits for the mutex while holding the GIL: the
  // holder may be a thread that needs the GIL back before it can unlock.
  template <class F>
  auto locked(int64_t work, F f) -> decltype(f()) {
    std::unique_lock<std::mutex> lock(mutex, std::try_to_lock);
    if (!lock.owns_lock()) {
      py::gil_scoped_release release;
      lock.lock();
    }
    if (work > kLongCall) {
      py::gil_scoped_release release;
      return f();
    }
    return f();
  }

  // The key of a draw, and (once the draw succeeded) the step past it on the tree's stream.
  // Split in two because a draw that throws must not move the stream.
  uint64_t key_of(const std::optional<uint64_t>& seed) const {
    return seed ? key_from_seed(*seed) : key_for_call(stream_seed, stream_calls);
  }
  void advance(const std::optional<uint64_t>& seed) {
    if (!seed) ++stream_calls;
  }

  Tree tree;
  std::mutex mutex;
  uint64_t stream_seed;
  uint64_t stream_calls = 0;
  // Fast-path scratch (used under the lock): float32 values widened, new scores, leaves.
  std::vector<double> values_scratch, scores_scratch, leaves_scratch;
};

DistinctMethod distinct_method(const std::string& name) {
  if (name == "auto") return DistinctMethod::kAuto;
  if (name == "race") return DistinctMethod::kRace;
  if (name == "removal") return DistinctMethod::kRemoval;
  throw std::invalid_argument("method must be 'auto', 'race' or 'removal', got '" + name + "'");
}

using SumHandle = Handle<SumTree>;
using SoftmaxHandle = Handle<SoftmaxTree>;
using DeviceHandle = Handle<std::unique_ptr<DeviceTreeApi>>;

// A prioritized replay buffer's CPU calls, one core call each (isample/integrations/replay.py):
// its tree (a SumTree handle, kept alive here) and its fields (replay_fields.h). The ring's
// position and size stay in Python and come with each call. Every method returns None /
// False, having changed nothing, for arguments that are not plain and for input the buffer
// must refuse; the Python layer then takes its general path, which says why.
struct ReplayStore {
  ReplayStore(py::object tree_object, py::handle generic, double alpha, double eps, int normalize)
      : owner(std::move(tree_object)), handle(handle_of(owner)), fields(arrays, generic.ptr()), alpha(alpha), eps(eps),
        how(Normalize(normalize)) {
    if (normalize < 0 || normalize > 2) throw std::invalid_argument("normalize must be 0 (none), 1 (batch) or 2 (buffer)");
    if (how == Normalize::kBuffer && !handle->tree.tracks_min()) {
      throw std::invalid_argument("normalize='buffer' needs a tree that tracks its smallest weight (track_min)");
    }
  }
  static SumHandle* handle_of(const py::object& tree) {
    if (!py::isinstance<SumHandle>(tree)) throw py::type_error("tree must be an isample._core.SumTree");
    return tree.cast<SumHandle*>();
  }
  py::object owner;
  SumHandle* handle;
  ReplayFields fields;
  double alpha, eps;
  Normalize how;
};

PyObject* interned(const char* text) {
  PyObject* s = PyUnicode_InternFromString(text);
  if (s == nullptr) throw py::error_already_set();
  return s;  // kept for the process's lifetime
}

// -- ReplayStore's Python type ------------------------------------------------------------------
// A plain CPython type rather than a pybind11 class: its three per-step methods are
// METH_FASTCALL functions. In a training loop each is called once per step with caches
// the forward and backward passes have just swept, and there pybind11's generic dispatch
// costs several times a builtin's (measured in a DQN loop: a no-op pybind11 call ~3 us,
// a builtin ~1 us). Errors from the core become the exceptions pybind11 would raise.

template <class F>
PyObject* translated(F f) {
  try {
    return f();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (const OutOfMemory& e) {
    PyErr_SetString(PyExc_MemoryError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::out_of_range& e) {
    PyErr_SetString(PyExc_IndexError, e.what());
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const py::type_error& e) {
    PyErr_SetString(PyExc_TypeError, e.what());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}


// A METH_FASTCALL method's argument count, or a TypeError naming it ("ReplayStore.update").
bool argument_count(const char* name, Py_ssize_t nargs, Py_ssize_t expected) {
  if (nargs == expected) return true;
  PyErr_Format(PyExc_TypeError, "%s takes %zd arguments, got %zd", name, expected, nargs);
  return false;
}

// A plain CPython type from its spec; `init`, if given, becomes its __init__ as a method
// whose docstring carries the signature, as pybind11's classes have (the stub test reads
// it); construction goes through it (not hot).
py::object make_type(PyType_Spec& spec, PyMethodDef* init) {
  py::object type = py::reinterpret_steal<py::object>(PyType_FromSpec(&spec));
  if (!type) throw py::error_already_set();
  if (init != nullptr) {
    py::object method = py::reinterpret_steal<py::object>(PyDescr_NewMethod(reinterpret_cast<PyTypeObject*>(type.ptr()), init));
    if (!method || PyObject_SetAttrString(type.ptr(), "__init__", method.ptr()) != 0) throw py::error_already_set();
  }
  return type;
}

PyObject* new_value(bool value) {
  PyObject* result = value ? Py_True : Py_False;
  Py_INCREF(result);
  return result;
}

// A plain CPython object that owns one core object T (ReplayStore, SamplerStep): empty when
// __new__ makes it, filled by __init__ (a second __init__ replaces it), freed with it.
template <class T>
struct Holder {
  PyObject_HEAD
  T* held;
};

template <class T>
T* held(PyObject* self) {
  return reinterpret_cast<Holder<T>*>(self)->held;
}

// The held object; RuntimeError (false) for one that __init__ never filled.
template <class T>
bool filled(PyObject* self, const char* type_name) {
  if (held<T>(self) != nullptr) return true;
  PyErr_Format(PyExc_RuntimeError, "%s.__init__ was not called", type_name);
  return false;
}

template <class T>
PyObject* holder_new(PyTypeObject* type, PyObject*, PyObject*) {
  PyObject* self = type->tp_alloc(type, 0);
  if (self != nullptr) reinterpret_cast<Holder<T>*>(self)->held = nullptr;
  return self;
}

template <class T>
void holder_dealloc(PyObject* self) {
  delete held<T>(self);
  PyTypeObject* type = Py_TYPE(self);
  type->tp_free(self);
  Py_DECREF(type);  // a heap type: its instances hold a reference to it
}

// An __init__ body (which makes the core object, throwing as the core does) as tp_init: the
// new object replaces the old one only once it is made.
template <class T, class F>
int fill(PyObject* self, F make) {
  PyObject* done = translated([&]() -> PyObject* {
    std::unique_ptr<T> made = make();
    delete held<T>(self);
    reinterpret_cast<Holder<T>*>(self)->held = made.release();
    Py_RETURN_NONE;
  });
  if (done == nullptr) return -1;
  Py_DECREF(done);
  return 0;
}

// tp_init as a method too, so that __init__ carries its signature (as pybind11's do).
template <int (*Init)(PyObject*, PyObject*, PyObject*)>
PyObject* init_method(PyObject* self, PyObject* args, PyObject* kwargs) {
  if (Init(self, args, kwargs) != 0) return nullptr;
  Py_RETURN_NONE;
}

ReplayStore& store_of(PyObject* self) { return *held<ReplayStore>(self); }
bool has_store(PyObject* self) { return filled<ReplayStore>(self, "ReplayStore"); }

// __init__(tree, generic, alpha, eps, normalize); a second call replaces the store.
int replay_store_init(PyObject* self, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"tree", "generic", "alpha", "eps", "normalize", nullptr};
  PyObject *tree = nullptr, *generic = nullptr;
  double alpha = 0.0, eps = 0.0;
  int normalize = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOddi", const_cast<char**>(keywords), &tree, &generic, &alpha, &eps,
                                   &normalize)) {
    return -1;
  }
  return fill<ReplayStore>(self, [&] {
    return std::make_unique<ReplayStore>(py::reinterpret_borrow<py::object>(tree), generic, alpha, eps, normalize);
  });
}

PyObject* replay_add_field(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!argument_count("ReplayStore.add_field", nargs, 4)) return nullptr;
  if (!has_store(self)) return nullptr;
  return translated([&]() -> PyObject* {
    ReplayStore& s = store_of(self);
    const auto sources = py::cast<std::vector<std::string>>(py::handle(args[2]));
    const auto python = py::cast<unsigned>(py::handle(args[3]));
    s.fields.add(args[0], args[1], sources, python);
    if (s.fields.field(s.fields.size() - 1).rows != s.handle->tree.capacity()) {
      throw std::invalid_argument("a replay field must have one row per slot of the tree");
    }
    Py_RETURN_NONE;
  });
}

// add_one(values: dict, slot: int, leaf: float) -> the slot as an int64 tensor (1,), or None
PyObject* replay_add_one(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!argument_count("ReplayStore.add_one", nargs, 3)) return nullptr;
  if (!has_store(self)) return nullptr;
  const long long slot_value = PyLong_AsLongLong(args[1]);
  if (slot_value == -1 && PyErr_Occurred()) return nullptr;
  const double leaf = PyFloat_AsDouble(args[2]);
  if (leaf == -1.0 && PyErr_Occurred()) return nullptr;
  return translated([&]() -> PyObject* {
    ReplayStore& s = store_of(self);
    SumTree& tree = s.handle->tree;
    int64_t slot = slot_value;
    std::vector<ReadyValue> ready;
    if (!arrays.makes_tensors() || !s.fields.prepare(args[0], ready) || slot < 0 || slot >= tree.capacity() ||
        !(leaf >= 0.0 && leaf <= std::numeric_limits<double>::max())) {
      Py_RETURN_NONE;
    }
    void* data = nullptr;
    py::object out = py::reinterpret_steal<py::object>(arrays.new_tensor(1, ElementType::kInt64, data));
    if (!out) throw py::error_already_set();
    *static_cast<int64_t*>(data) = slot;
    const bool written = s.handle->locked(1, [&] {
      try {
        tree.update(&slot, &leaf, 1);  // first: only the tree can still refuse (a total that overflows)
      } catch (const std::invalid_argument&) {
        return false;
      }
      s.fields.write(slot, ready);
      return true;
    });
    if (!written) Py_RETURN_NONE;
    return out.release().ptr();
  });
}

// sample_into(out: dict, k: int, beta: float, size: int) -> bool
PyObject* replay_sample_into(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!argument_count("ReplayStore.sample_into", nargs, 4)) return nullptr;
  if (!has_store(self)) return nullptr;
  const double beta = PyFloat_AsDouble(args[2]);
  if (beta == -1.0 && PyErr_Occurred()) return nullptr;
  const long long size = PyLong_AsLongLong(args[3]);
  if (size == -1 && PyErr_Occurred()) return nullptr;
  static PyObject* const indices_key = interned("indices");
  static PyObject* const weights_key = interned("weights");
  return translated([&]() -> PyObject* {
    ReplayStore& s = store_of(self);
    PyObject* out = args[0];
    int64_t k = 0;
    if (!arrays.makes_tensors() || !PyDict_Check(out) || !plain_count(args[1], kFastDrawLimit, k) || size <= 0 ||
        size > s.handle->tree.capacity() || !(beta >= 0.0 && beta <= 1.0)) {
      return new_value(false);
    }
    void *drawn = nullptr, *weights = nullptr;
    py::object index = py::reinterpret_steal<py::object>(arrays.new_tensor(k, ElementType::kInt64, drawn));
    if (!index) throw py::error_already_set();
    py::object weight = py::reinterpret_steal<py::object>(arrays.new_tensor(k, ElementType::kFloat32, weights));
    if (!weight) throw py::error_already_set();
    std::vector<PyObject*> made;
    std::vector<char*> rows;
    if (!s.fields.allocate_rows(k, made, rows)) throw py::error_already_set();
    std::vector<py::object> columns;
    for (PyObject* column : made) columns.push_back(py::reinterpret_steal<py::object>(column));
    SumHandle& h = *s.handle;
    h.locked(k, [&] {
      SumTree& tree = h.tree;
      int64_t* items = static_cast<int64_t*>(drawn);
      tree.sample_with_replacement(h.key_of(std::nullopt), k, items);  // throws for an all-zero tree
      h.leaves_scratch.resize(size_t(k));
      tree.get(items, k, h.leaves_scratch.data());
      const double reference = s.how == Normalize::kNone     ? double(size) / tree.total()
                               : s.how == Normalize::kBuffer ? tree.min_positive()
                                                             : 0.0;
      importance_weights(h.leaves_scratch.data(), k, beta, s.how, reference, static_cast<float*>(weights));
      s.fields.gather(items, k, rows);
      h.advance(std::nullopt);
    });
    for (size_t i = 0; i < columns.size(); ++i) {
      if (PyDict_SetItem(out, s.fields.field(i).name, columns[i].ptr()) != 0) throw py::error_already_set();
    }
    if (PyDict_SetItem(out, indices_key, index.ptr()) != 0 || PyDict_SetItem(out, weights_key, weight.ptr()) != 0) {
      throw py::error_already_set();
    }
    return new_value(true);
  });
}

// update(indices, priorities, size: int) -> the largest priority (-inf for none), or None
PyObject* replay_update(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!argument_count("ReplayStore.update", nargs, 3)) return nullptr;
  if (!has_store(self)) return nullptr;
  const long long size = PyLong_AsLongLong(args[2]);
  if (size == -1 && PyErr_Occurred()) return nullptr;
  return translated([&]() -> PyObject* {
    ReplayStore& s = store_of(self);
    ArrayView i, p;
    if (!int64_array(args[0], i) || !real_array(args[1], i.length, p)) Py_RETURN_NONE;
    const int64_t k = i.length;
    const int64_t* index = static_cast<const int64_t*>(i.data);
    double largest = -std::numeric_limits<double>::infinity();
    SumHandle& h = *s.handle;
    const bool done = h.locked(k, [&] {
      uint64_t outside = 0;  // also catches negative indices
      for (int64_t j = 0; j < k; ++j) outside |= uint64_t(uint64_t(index[j]) >= uint64_t(size));
      if (outside != 0) return false;
      h.leaves_scratch.resize(size_t(k));
      double* leaves = h.leaves_scratch.data();
      const bool ok = p.type == ElementType::kFloat64
                          ? priority_leaves(static_cast<const double*>(p.data), k, s.alpha, s.eps, leaves, largest)
                          : priority_leaves(static_cast<const float*>(p.data), k, s.alpha, s.eps, leaves, largest);
      if (!ok) return false;
      try {
        h.tree.update(index, leaves, k);  // checks again, refuses a total that overflows
      } catch (const std::invalid_argument&) {
        return false;
      }
      return true;
    });
    if (!done) Py_RETURN_NONE;
    return PyFloat_FromDouble(largest);
  });
}

PyMethodDef replay_store_init_def = {
    "__init__", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(init_method<replay_store_init>)),
    METH_VARARGS | METH_KEYWORDS,
    "__init__(self: isample._core.ReplayStore, tree: isample._core.SumTree, generic: type, alpha: float, eps: float, "
    "normalize: int) -> None\n\nFor a SumTree handle (normalize 0: none, 1: batch, 2: buffer, which needs "
    "track_min) and numpy.generic."};

PyMethodDef replay_store_methods[] = {
    {"add_field", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(replay_add_field)), METH_FASTCALL,
     "add_field(self: isample._core.ReplayStore, name: str, storage: object, sources: list[str], python: int) -> None"
     "\n\nA field, its storage (C-contiguous CPU tensor, one row per slot), the numpy dtype names it takes "
     "unchecked, and the Python numbers it takes (1 bool, 2 int, 4 float)."},
    {"add_one", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(replay_add_one)), METH_FASTCALL,
     "add_one(self: isample._core.ReplayStore, values: dict, slot: int, leaf: float) -> object\n\nStore one item (a dict: field -> value) in `slot` with tree leaf `leaf`; "
     "the slot as an int64 tensor (1,), or None (nothing done) for values that are not plain or a leaf the "
     "tree refuses."},
    {"sample_into", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(replay_sample_into)), METH_FASTCALL,
     "sample_into(self: isample._core.ReplayStore, out: dict, k: object, beta: float, size: int) -> bool\n\n"
     "Draw k items with replacement into the dict `out`: each field's rows, "
     "'indices' (int64) and 'weights' (float32, normalised as configured; `size` items stored). False "
     "(nothing done) for arguments that are not plain."},
    {"update", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(replay_update)), METH_FASTCALL,
     "update(self: isample._core.ReplayStore, indices: object, priorities: object, size: int) -> object\n\n"
     "Leaves (p + eps) ** alpha at int64 `indices` (each below `size`) "
     "for float64/float32 priorities (finite, >= 0), all checked before the tree changes; the largest "
     "priority (-inf for none), or None (nothing done) for arguments that are not plain or input the buffer "
     "must refuse."},
    {nullptr, nullptr, 0, nullptr},
};

py::object make_replay_store_type() {
  static PyType_Slot slots[] = {
      {Py_tp_new, reinterpret_cast<void*>(holder_new<ReplayStore>)},
      {Py_tp_init, reinterpret_cast<void*>(replay_store_init)},
      {Py_tp_dealloc, reinterpret_cast<void*>(holder_dealloc<ReplayStore>)},
      {Py_tp_methods, replay_store_methods},
      {Py_tp_doc, const_cast<char*>(
                      "ReplayStore(tree, generic, alpha, eps, normalize): a prioritized replay buffer's add / sample "
                      "/ update_priorities on the CPU, one core call each, for a SumTree handle (normalize 0: none, "
                      "1: batch, 2: buffer, which needs track_min) and numpy.generic.")},
      {0, nullptr},
  };
  static PyType_Spec spec = {"isample._core.ReplayStore", sizeof(Holder<ReplayStore>), 0, Py_TPFLAGS_DEFAULT, slots};
  return make_type(spec, &replay_store_init_def);
}

// -- SamplerLock: the reentrant lock of a sampler ---------------------------------------------
// threading.RLock's behaviour (acquire, release, with), as a type of the core so that
// SamplerStep.update takes it with two C calls rather than two Python calls. The GIL is held
// except while waiting, as with RLock.
struct SamplerLockObject {
  PyObject_HEAD
  PyThread_type_lock lock;
  unsigned long owner;
  unsigned long count;
};

SamplerLockObject* lock_of(PyObject* self) { return reinterpret_cast<SamplerLockObject*>(self); }

PyObject* sampler_lock_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  if (PyTuple_GET_SIZE(args) != 0 || (kwargs != nullptr && PyDict_GET_SIZE(kwargs) != 0)) {
    PyErr_SetString(PyExc_TypeError, "SamplerLock() takes no arguments");
    return nullptr;
  }
  PyObject* self = type->tp_alloc(type, 0);
  if (self == nullptr) return nullptr;
  SamplerLockObject* l = lock_of(self);
  l->owner = 0;
  l->count = 0;
  l->lock = PyThread_allocate_lock();
  if (l->lock == nullptr) {
    Py_DECREF(self);
    return PyErr_NoMemory();
  }
  return self;
}

void sampler_lock_dealloc(PyObject* self) {
  if (lock_of(self)->lock != nullptr) PyThread_free_lock(lock_of(self)->lock);
  PyTypeObject* type = Py_TYPE(self);
  type->tp_free(self);
  Py_DECREF(type);
}

// Take the lock (again, for its owner); waits without the GIL, in slices, so that a signal
// (Ctrl-C) is handled while it waits, as RLock's acquire does. Returns false with the
// Python error set when a signal handler raised or the count would overflow.
bool take_lock(SamplerLockObject* l) {
  const unsigned long me = PyThread_get_thread_ident();
  if (l->count > 0 && l->owner == me) {
    if (l->count == std::numeric_limits<unsigned long>::max()) {
      PyErr_SetString(PyExc_OverflowError, "SamplerLock taken too many times");
      return false;
    }
    ++l->count;
    return true;
  }
  while (!PyThread_acquire_lock(l->lock, NOWAIT_LOCK)) {
    PyLockStatus status;
    Py_BEGIN_ALLOW_THREADS
    status = PyThread_acquire_lock_timed(l->lock, 50000, 0);  // 50 ms
    Py_END_ALLOW_THREADS
    if (status == PY_LOCK_ACQUIRED) break;
    if (PyErr_CheckSignals() != 0) return false;
  }
  l->owner = me;
  l->count = 1;
  return true;
}

bool give_lock(SamplerLockObject* l) {
  if (l->count == 0 || l->owner != PyThread_get_thread_ident()) {
    PyErr_SetString(PyExc_RuntimeError, "cannot release a SamplerLock this thread does not hold");
    return false;
  }
  if (--l->count == 0) {
    l->owner = 0;
    PyThread_release_lock(l->lock);
  }
  return true;
}

PyObject* sampler_lock_acquire(PyObject* self, PyObject* const*, Py_ssize_t nargs) {
  if (nargs != 0) {
    PyErr_SetString(PyExc_TypeError, "SamplerLock.acquire takes no arguments (it always waits)");
    return nullptr;
  }
  if (!take_lock(lock_of(self))) return nullptr;
  Py_RETURN_TRUE;
}

PyObject* sampler_lock_exit(PyObject* self, PyObject* const*, Py_ssize_t) {
  if (!give_lock(lock_of(self))) return nullptr;
  Py_RETURN_NONE;
}

PyObject* sampler_lock_release(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!argument_count("SamplerLock.release", nargs, 0)) return nullptr;
  return sampler_lock_exit(self, args, nargs);
}

PyObject* sampler_lock_held(PyObject* self, PyObject* const*, Py_ssize_t) {
  return new_value(lock_of(self)->count > 0 && lock_of(self)->owner == PyThread_get_thread_ident());
}

PyMethodDef sampler_lock_methods[] = {
    {"acquire", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sampler_lock_acquire)), METH_FASTCALL,
     "acquire(self: isample._core.SamplerLock) -> bool\n\nTake the lock, waiting (without the GIL) for another "
     "thread to release it; its holder may take it again."},
    {"release", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sampler_lock_release)), METH_FASTCALL,
     "release(self: isample._core.SamplerLock) -> None\n\nRelease it once; RuntimeError for a thread that does "
     "not hold it."},
    {"__enter__", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sampler_lock_acquire)), METH_FASTCALL,
     "__enter__(self: isample._core.SamplerLock) -> bool"},
    {"__exit__", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sampler_lock_exit)), METH_FASTCALL,
     "__exit__(self: isample._core.SamplerLock, *args) -> None"},
    {"held", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sampler_lock_held)), METH_FASTCALL,
     "held(self: isample._core.SamplerLock) -> bool\n\nWhether this thread holds it."},
    {nullptr, nullptr, 0, nullptr},
};

PyTypeObject* sampler_lock_type = nullptr;  // set when the module is made

py::object make_sampler_lock_type() {
  static PyType_Slot slots[] = {
      {Py_tp_new, reinterpret_cast<void*>(sampler_lock_new)},
      {Py_tp_dealloc, reinterpret_cast<void*>(sampler_lock_dealloc)},
      {Py_tp_methods, sampler_lock_methods},
      {Py_tp_doc, const_cast<char*>("SamplerLock(): a reentrant lock (acquire, release, with), as threading.RLock, "
                                    "that the core's SamplerStep takes without a Python call.")},
      {0, nullptr},
  };
  static PyType_Spec spec = {"isample._core.SamplerLock", sizeof(SamplerLockObject), 0, Py_TPFLAGS_DEFAULT, slots};
  py::object type = make_type(spec, nullptr);
  sampler_lock_type = reinterpret_cast<PyTypeObject*>(type.ptr());
  Py_INCREF(type.ptr());  // kept for the process's lifetime, as the module is
  return type;
}

// -- SamplerStep: an ImportanceSampler's per-step calls on the CPU ------------------------------
// sampler.weights and sampler.update run once per training step, like the replay buffer's
// calls, and for the same reason are METH_FASTCALL methods of a plain CPython type: each
// crossing of pybind11's generic dispatch costs more than the work of a 128-item batch.
// The step holds what stays fixed for the sampler's life (its tree, its score store, its
// transform's constants and its lock), so a call reads only the batch. Every method
// returns None / False, having changed nothing, for arguments that are not plain and for a
// batch the core refuses; the Python layer then takes its general path, which says why.
enum class StepKind { kNone = 0, kSoftmax = 1, kProportional = 2, kScores = 3 };

struct SamplerStep {
  int64_t n = 0;
  StepKind kind = StepKind::kNone;
  py::object tree_owner;  // the SumTree (proportional) or SoftmaxTree (softmax) handle
  SumHandle* sum = nullptr;
  SoftmaxHandle* softmax = nullptr;
  py::object store_owner;  // the float64 score store (n) of the proportional and scores kinds
  double* store = nullptr;
  double alpha = 1.0, eps = 0.0;
  py::object lock_owner;  // the sampler's lock (a SamplerLock)
  SamplerLockObject* lock = nullptr;
  // The epoch weights last read: an epoch's table is read at every step, so its address is
  // kept with a reference to it (the sampler's own tensor, never resized) and found again
  // by identity instead of through DLPack.
  py::object weights_owner;
  const double* weights = nullptr;
};

PyTypeObject* sampler_step_type = nullptr;  // set when the module is made

SamplerStep& step_of(PyObject* self) { return *held<SamplerStep>(self); }
bool has_step(PyObject* self) { return filled<SamplerStep>(self, "SamplerStep"); }

// A plain float64 CPU tensor of exactly n elements: its memory (a reference kept in `owner`).
double* own_float64(py::handle object, int64_t n, py::object& owner, const char* what) {
  ArrayView view;
  if (!arrays.view(object.ptr(), view) || view.type != ElementType::kFloat64 || view.length != n) {
    throw std::invalid_argument(std::string(what) + " must be a contiguous float64 CPU tensor of " + std::to_string(n) +
                                " elements");
  }
  owner = py::reinterpret_borrow<py::object>(object);
  return static_cast<double*>(const_cast<void*>(view.data));
}

// __init__(n, kind, tree, store, alpha, eps, lock)
int sampler_step_init(PyObject* self, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"n", "kind", "tree", "store", "alpha", "eps", "lock", nullptr};
  long long n = 0;
  int kind = 0;
  PyObject *tree = nullptr, *store = nullptr, *lock = nullptr;
  double alpha = 1.0, eps = 0.0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LiOOddO", const_cast<char**>(keywords), &n, &kind, &tree, &store,
                                   &alpha, &eps, &lock)) {
    return -1;
  }
  return fill<SamplerStep>(self, [&] {
    if (n < 1 || n > kMaxCapacity) throw std::invalid_argument("n must be between 1 and 2^40");
    if (kind < 0 || kind > 3) throw std::invalid_argument("kind must be 0 (none), 1 (softmax), 2 (proportional) or 3 (scores)");
    auto made = std::make_unique<SamplerStep>();
    SamplerStep& s = *made;
    s.n = n;
    s.kind = StepKind(kind);
    py::handle t(tree);
    if (s.kind == StepKind::kSoftmax) {
      if (!py::isinstance<SoftmaxHandle>(t)) throw py::type_error("tree must be an isample._core.SoftmaxTree");
      s.softmax = t.cast<SoftmaxHandle*>();
      if (s.softmax->tree.capacity() != n) throw std::invalid_argument("the tree must hold n items");
    } else if (s.kind == StepKind::kProportional) {
      if (!py::isinstance<SumHandle>(t)) throw py::type_error("tree must be an isample._core.SumTree");
      s.sum = t.cast<SumHandle*>();
      if (s.sum->tree.capacity() != n) throw std::invalid_argument("the tree must hold n items");
    }
    s.tree_owner = py::reinterpret_borrow<py::object>(t);
    if (s.kind == StepKind::kProportional || s.kind == StepKind::kScores) {
      if (store == Py_None) throw py::type_error("store must be the float64 score tensor");
      s.store_owner = py::reinterpret_borrow<py::object>(store);
      if (arrays.makes_tensors()) s.store = own_float64(store, n, s.store_owner, "store");
    }
    if (!(alpha >= 0.0 && std::isfinite(alpha) && eps >= 0.0 && std::isfinite(eps))) {
      throw std::invalid_argument("alpha and eps must be finite and >= 0");
    }
    s.alpha = alpha;
    s.eps = eps;
    if (sampler_lock_type == nullptr || Py_TYPE(lock) != sampler_lock_type) {
      throw py::type_error("lock must be an isample._core.SamplerLock");
    }
    s.lock_owner = py::reinterpret_borrow<py::object>(lock);
    s.lock = lock_of(lock);
    return made;
  });
}

// The epoch's weight table (`source`: a float64 tensor of n, or None for an epoch drawn
// uniformly, whose weights are all 1), as an address (null for None); false for a table that
// is not plain.
bool weight_table(SamplerStep& s, PyObject* source, const double*& weight) {
  weight = nullptr;
  if (source == Py_None) return true;
  if (source != s.weights_owner.ptr()) {
    ArrayView w;
    if (!arrays.view(source, w) || w.type != ElementType::kFloat64 || w.length != s.n) return false;
    s.weights_owner = py::reinterpret_borrow<py::object>(source);
    s.weights = static_cast<const double*>(w.data);
  }
  weight = s.weights;
  return true;
}

// A batch's weights: a new tensor of weight[index[j]] * scale (1 * scale where `weight` is
// null), float64 or float32 (rounded from the float64 product), made in one pass that also
// checks the batch. Null when an index is outside [0, n) (`outside` is its position) or an
// item has no weight (NaN in the table: not drawn in the epoch; `undrawn` is its position),
// and with the Python error set when the tensor cannot be made.
PyObject* gathered_weights(const SamplerStep& s, const double* weight, const int64_t* index, int64_t k, ElementType type,
                           double scale, int64_t& outside, int64_t& undrawn) {
  outside = undrawn = -1;
  void* data = nullptr;
  PyObject* out = arrays.new_tensor(k, type, data);
  if (out == nullptr) return nullptr;
  bool missing = false;
  const uint64_t n = uint64_t(s.n);
  for (int64_t j = 0; j < k; ++j) {
    if (uint64_t(index[j]) >= n) {  // negative indices too
      outside = j;
      break;
    }
    const double w = weight != nullptr ? weight[index[j]] : 1.0;
    missing |= w != w;
    if (type == ElementType::kFloat32) {
      static_cast<float*>(data)[j] = float(w * scale);
    } else {
      static_cast<double*>(data)[j] = w * scale;
    }
  }
  if (outside < 0 && missing) {
    for (int64_t j = 0; undrawn < 0; ++j) {
      if (weight[index[j]] != weight[index[j]]) undrawn = j;
    }
  }
  if (outside >= 0 || undrawn >= 0) {
    Py_DECREF(out);
    return nullptr;
  }
  return out;
}

// weights(weight_of, indices, dtype, device, scale) -> tensor, the position (int) of an item
// without a weight, or None.
PyObject* sampler_step_weights(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!argument_count("SamplerStep.weights", nargs, 5)) return nullptr;
  if (!has_step(self)) return nullptr;
  return translated([&]() -> PyObject* {
    SamplerStep& s = step_of(self);
    PyObject* scale_object = args[4];
    if (!arrays.makes_tensors() || !PyFloat_CheckExact(scale_object) || !arrays.cpu_device(args[3])) Py_RETURN_NONE;
    const double scale = PyFloat_AS_DOUBLE(scale_object);
    const ElementType type = arrays.float_dtype(args[2]);
    ArrayView i;
    const double* weight = nullptr;
    if (!std::isfinite(scale) || type == ElementType::kOther || !int64_array(args[1], i) || !weight_table(s, args[0], weight)) {
      Py_RETURN_NONE;
    }
    const int64_t* index = static_cast<const int64_t*>(i.data);
    int64_t outside = -1, undrawn = -1;
    PyObject* out = gathered_weights(s, weight, index, i.length, type, scale, outside, undrawn);
    if (outside >= 0) {
      throw std::out_of_range("index " + std::to_string(index[outside]) + " is out of range for " + std::to_string(s.n) + " items");
    }
    if (undrawn >= 0) return PyLong_FromLongLong(undrawn);
    return out;
  });
}

// The scores s = keep * S + (1 - keep) * values of a batch into the step's scores (and, for
// the tree kinds, its tree): false, nothing written, for a batch the core refuses.
bool store_batch(SamplerStep& s, const ArrayView& i, const ArrayView& v, double keep) {
  if (!(keep >= 0.0 && keep <= 1.0)) return false;  // NaN too: the general path refuses it
  const int64_t k = i.length;
  const int64_t* index = static_cast<const int64_t*>(i.data);
  try {
    if (s.store == nullptr && s.store_owner) {  // made while the fast paths were off (tests): read it now
      if (!arrays.makes_tensors()) return false;
      s.store = own_float64(s.store_owner, s.n, s.store_owner, "store");
    }
    switch (s.kind) {
      case StepKind::kSoftmax: {
        SoftmaxHandle& h = *s.softmax;
        h.locked(k, [&] { h.tree.update(index, as_doubles(v, h.values_scratch), k, keep); });
        return true;
      }
      case StepKind::kProportional: {
        SumHandle& h = *s.sum;
        h.locked(k, [&] {
          const double* given = as_doubles(v, h.values_scratch);
          h.scores_scratch.resize(size_t(k));
          h.leaves_scratch.resize(size_t(k));
          const double* scores = blend_scores(s.store, s.n, index, given, k, keep, h.scores_scratch.data());
          proportional_leaves(scores, k, s.alpha, s.eps, h.leaves_scratch.data());
          h.tree.update(index, h.leaves_scratch.data(), k);  // checks the leaves and the total first
          write_scores(s.store, index, scores, k);
        });
        return true;
      }
      case StepKind::kScores: {
        std::vector<double> widened, mixed(keep != 0.0 ? size_t(k) : 0);  // keep 0: the values are the scores
        write_scores(s.store, index, blend_scores(s.store, s.n, index, as_doubles(v, widened), k, keep, mixed.data()), k);
        return true;
      }
      case StepKind::kNone:
        return false;
    }
  } catch (const std::invalid_argument&) {
  } catch (const std::out_of_range&) {
  }
  return false;
}

bool batch_views(PyObject* indices, PyObject* values, ArrayView& i, ArrayView& v) {
  return int64_array(indices, i) && real_array(values, i.length, v);
}

// store(indices, values, keep: float) -> bool
PyObject* sampler_step_store(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!argument_count("SamplerStep.store", nargs, 3)) return nullptr;
  if (!has_step(self)) return nullptr;
  const double keep = PyFloat_AsDouble(args[2]);
  if (keep == -1.0 && PyErr_Occurred()) return nullptr;
  return translated([&]() -> PyObject* {
    ArrayView i, v;
    return new_value(batch_views(args[0], args[1], i, v) && store_batch(step_of(self), i, v, keep));
  });
}

// store() with the score policy's keep (read at each call: a policy, or the sampler's
// policy itself, may change), under the sampler's lock, counted in counters["updates"]. False
// (nothing done) for a policy without a float keep in [0, 1] (it computes its scores itself,
// or the general path says what is wrong) and for a batch the core refuses.
bool counted_store(SamplerStep& s, const ArrayView& i, const ArrayView& v, PyObject* policy, PyObject* counters) {
  static PyObject* const keep_name = interned("keep");
  static PyObject* const updates_key = interned("updates");
  static PyObject* const one = PyLong_FromLong(1);
  py::object keep = py::reinterpret_steal<py::object>(PyObject_GetAttr(policy, keep_name));
  if (!keep) throw py::error_already_set();
  if (!PyFloat_CheckExact(keep.ptr()) || !PyDict_CheckExact(counters)) return false;
  if (!take_lock(s.lock)) throw py::error_already_set();
  struct Unlock {
    SamplerLockObject* lock;
    ~Unlock() { give_lock(lock); }  // cannot fail: this thread holds it
  } unlock{s.lock};
  if (!store_batch(s, i, v, PyFloat_AS_DOUBLE(keep.ptr()))) return false;
  // Looked up after the store, which may have let other threads run (waiting for the tree).
  PyObject* count = PyDict_GetItemWithError(counters, updates_key);  // borrowed, used at once
  if (count == nullptr && PyErr_Occurred()) throw py::error_already_set();
  py::object next = py::reinterpret_steal<py::object>(count != nullptr && PyLong_CheckExact(count) ? PyNumber_Add(count, one)
                                                                                                  : PyLong_FromLong(1));
  if (!next || PyDict_SetItem(counters, updates_key, next.ptr()) != 0) throw py::error_already_set();
  return true;
}

// update(indices, losses, policy, counters: dict) -> bool
PyObject* sampler_step_update(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!argument_count("SamplerStep.update", nargs, 4)) return nullptr;
  if (!has_step(self)) return nullptr;
  return translated([&]() -> PyObject* {
    SamplerStep& s = step_of(self);
    ArrayView i, v;
    return new_value(s.kind != StepKind::kNone && batch_views(args[0], args[1], i, v) &&
                     counted_store(s, i, v, args[2], args[3]));
  });
}

// weighted_update(weight_of, indices, losses, mean: bool, policy, counters: dict) -> tensor or None:
// a training step's weights(indices, dtype=losses.dtype, scale=1/b if mean else 1) and
// update(indices, losses) in one call (protocol.weighted_loss). None, having changed
// nothing, wherever either call would take its general path or raise.
PyObject* sampler_step_weighted_update(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  if (!argument_count("SamplerStep.weighted_update", nargs, 6)) return nullptr;
  if (!has_step(self)) return nullptr;
  return translated([&]() -> PyObject* {
    SamplerStep& s = step_of(self);
    ArrayView i, v;
    const double* weight = nullptr;
    if (s.kind == StepKind::kNone || !arrays.makes_tensors() || !batch_views(args[1], args[2], i, v) || i.length == 0 ||
        !weight_table(s, args[0], weight)) {
      Py_RETURN_NONE;
    }
    const int64_t k = i.length;
    const int64_t* index = static_cast<const int64_t*>(i.data);
    const int mean = PyObject_IsTrue(args[3]);
    if (mean < 0) throw py::error_already_set();
    // the weights first: an item they refuse, or a failure to make them, changes no score
    int64_t outside = -1, undrawn = -1;
    py::object weights = py::reinterpret_steal<py::object>(
        gathered_weights(s, weight, index, k, v.type, mean ? 1.0 / double(k) : 1.0, outside, undrawn));
    if (outside >= 0 || undrawn >= 0) Py_RETURN_NONE;
    if (!weights) throw py::error_already_set();
    if (!counted_store(s, i, v, args[4], args[5])) Py_RETURN_NONE;
    return weights.release().ptr();
  });
}

PyMethodDef sampler_step_init_def = {
    "__init__", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(init_method<sampler_step_init>)),
    METH_VARARGS | METH_KEYWORDS,
    "__init__(self: isample._core.SamplerStep, n: int, kind: int, tree: object, store: object, alpha: float, "
    "eps: float, lock: object) -> None\n\nkind 0: weights only; 1: a SoftmaxTree holds the "
    "scores; 2: proportional leaves (max(s, 0) + eps) ** alpha of the float64 score store `store` in a "
    "SumTree; 3: the score store alone. `lock` is the sampler's SamplerLock."};

PyMethodDef sampler_step_methods[] = {
    {"weights", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sampler_step_weights)), METH_FASTCALL,
     "weights(self: isample._core.SamplerStep, weight_of: object, indices: object, dtype: object, device: object, "
     "scale: object) -> object\n\nweight_of[indices] * scale (float64 table of n, or None: all 1) as a new "
     "tensor of `dtype` (None: float64; float32) on `device` (None or the CPU); the position of the first "
     "item without a weight (NaN) instead; None for arguments that are not plain. IndexError for an index "
     "outside [0, n)."},
    {"store", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sampler_step_store)), METH_FASTCALL,
     "store(self: isample._core.SamplerStep, indices: object, values: object, keep: float) -> bool\n\n"
     "Scores keep * S + (1 - keep) * values at int64 `indices`, and their leaves, all checked before anything "
     "is written; False (nothing done) for arguments that are not plain or a batch the core refuses."},
    {"update", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sampler_step_update)), METH_FASTCALL,
     "update(self: isample._core.SamplerStep, indices: object, losses: object, policy: object, counters: dict) -> "
     "bool\n\nstore() with the score policy's keep, under the sampler's lock, counted in counters['updates']; "
     "False (nothing done) where store() would be, and for a policy without a float keep in [0, 1]."},
    {"weighted_update", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(sampler_step_weighted_update)),
     METH_FASTCALL,
     "weighted_update(self: isample._core.SamplerStep, weight_of: object, indices: object, losses: object, mean: "
     "object, policy: object, counters: dict) -> object\n\nweights(weight_of, indices, losses.dtype, None, 1 / b "
     "if mean else 1) and update(indices, losses, policy, counters) in one call: the weights, or None (nothing "
     "done) wherever either would take its general path or raise."},
    {nullptr, nullptr, 0, nullptr},
};

py::object make_sampler_step_type() {
  static PyType_Slot slots[] = {
      {Py_tp_new, reinterpret_cast<void*>(holder_new<SamplerStep>)},
      {Py_tp_init, reinterpret_cast<void*>(sampler_step_init)},
      {Py_tp_dealloc, reinterpret_cast<void*>(holder_dealloc<SamplerStep>)},
      {Py_tp_methods, sampler_step_methods},
      {Py_tp_doc, const_cast<char*>(
                      "SamplerStep(n, kind, tree, store, alpha, eps, lock): an ImportanceSampler's "
                      "weights and update on the CPU, one core call each.")},
      {0, nullptr},
  };
  static PyType_Spec spec = {"isample._core.SamplerStep", sizeof(Holder<SamplerStep>), 0, Py_TPFLAGS_DEFAULT, slots};
  py::object type = make_type(spec, &sampler_step_init_def);
  sampler_step_type = reinterpret_cast<PyTypeObject*>(type.ptr());
  Py_INCREF(type.ptr());  // kept for the process's lifetime, as the module is
  return type;
}

// -- StepMethod: EpochSampler.weights and .update, the compiled step first ----------------------
// A sampler's `weights` and `update` are called once per training step. Written in Python,
// each costs a frame (~0.1-0.2 us with **extra and keyword defaults) before it reaches the
// step; as a method descriptor of C (Py_TPFLAGS_METHOD_DESCRIPTOR: `sampler.update(i, l)`
// calls it with the sampler as first argument, no bound method made) the call goes straight
// to the sampler's SamplerStep, and only what the step does not take (other arguments, a
// CUDA sampler, a batch the core refuses) reaches the Python function, which is unchanged
// and says why. functools.update_wrapper gives it the function's name, docstring and
// signature (__wrapped__).
enum class StepCall { kWeights = 0, kUpdate = 1 };

struct StepMethodObject {
  PyObject_HEAD
  vectorcallfunc vectorcall;
  PyObject* general;  // the Python function: takes every call the step does not
  StepCall which;
  PyObject* dict;  // __doc__, __wrapped__, __name__, ... (functools.update_wrapper)
};

// The sampler's step, if it has one of the core's (a new reference), else null (no error).
PyObject* step_of_sampler(PyObject* sampler) {
  static PyObject* const name = interned("_step");
  PyObject* step = PyObject_GetAttr(sampler, name);
  if (step == nullptr) {
    PyErr_Clear();
    return nullptr;
  }
  if (Py_TYPE(step) != sampler_step_type || held<SamplerStep>(step) == nullptr) {
    Py_DECREF(step);
    return nullptr;
  }
  return step;
}

// sampler.update(indices, losses): True from the step, else the Python function.
PyObject* fast_update(PyObject* sampler, PyObject* const* args) {
  static PyObject* const policy_name = interned("score_policy");
  static PyObject* const counters_name = interned("_counters");
  PyObject* step = step_of_sampler(sampler);
  if (step == nullptr) return Py_NewRef(Py_False);
  PyObject* policy = PyObject_GetAttr(sampler, policy_name);
  PyObject* counters = policy != nullptr ? PyObject_GetAttr(sampler, counters_name) : nullptr;
  PyObject* done = nullptr;
  if (counters != nullptr) {
    PyObject* const call[4] = {args[0], args[1], policy, counters};
    done = sampler_step_update(step, call, 4);
  }
  Py_XDECREF(counters);
  Py_XDECREF(policy);
  Py_DECREF(step);
  return done;
}

// sampler.weights(indices, dtype=, device=, scale=): the weights from the step, else None.
PyObject* fast_weights(PyObject* sampler, PyObject* indices, PyObject* const* keywords, PyObject* kwnames) {
  static PyObject* const current_name = interned("_current");
  static PyObject* const weight_of_name = interned("weight_of");
  static PyObject* const dtype_name = interned("dtype");
  static PyObject* const device_name = interned("device");
  static PyObject* const scale_name = interned("scale");
  static PyObject* const one = PyFloat_FromDouble(1.0);
  PyObject *dtype = Py_None, *device = Py_None, *scale = one;
  const Py_ssize_t given = kwnames != nullptr ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t j = 0; j < given; ++j) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, j);  // interned by the compiler for literal keywords
    if (name == dtype_name) {
      dtype = keywords[j];
    } else if (name == device_name) {
      device = keywords[j];
    } else if (name == scale_name) {
      scale = keywords[j];
    } else {
      Py_RETURN_NONE;  // anything else: the Python function says what is wrong
    }
  }
  PyObject* step = step_of_sampler(sampler);
  if (step == nullptr) Py_RETURN_NONE;
  PyObject* current = PyObject_GetAttr(sampler, current_name);
  PyObject* weight_of = current != nullptr && current != Py_None ? PyObject_GetAttr(current, weight_of_name) : nullptr;
  Py_XDECREF(current);
  if (weight_of == nullptr) {
    PyErr_Clear();
    Py_DECREF(step);
    Py_RETURN_NONE;
  }
  PyObject* const call[5] = {weight_of, indices, dtype, device, scale};
  PyObject* weights = sampler_step_weights(step, call, 5);
  Py_DECREF(weight_of);
  Py_DECREF(step);
  if (weights != nullptr && PyLong_CheckExact(weights)) {  // an item the epoch did not draw: said below
    Py_DECREF(weights);
    Py_RETURN_NONE;
  }
  return weights;
}

PyObject* step_method_call(PyObject* self, PyObject* const* args, size_t nargsf, PyObject* kwnames) {
  auto* m = reinterpret_cast<StepMethodObject*>(self);
  if (m->general == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "StepMethod.__init__ was not called");
    return nullptr;
  }
  const Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
  PyObject* fast = nullptr;
  if (m->which == StepCall::kUpdate && nargs == 3 && kwnames == nullptr) {
    fast = fast_update(args[0], args + 1);
    if (fast == nullptr) return nullptr;
    if (fast == Py_True) {
      Py_DECREF(fast);
      Py_RETURN_NONE;
    }
  } else if (m->which == StepCall::kWeights && nargs == 2) {
    fast = fast_weights(args[0], args[1], args + nargs, kwnames);
    if (fast == nullptr || fast != Py_None) return fast;  // an error (IndexError, ...) or the weights
  }
  Py_XDECREF(fast);
  return PyObject_Vectorcall(m->general, args, nargsf, kwnames);
}

PyObject* step_method_new(PyTypeObject* type, PyObject*, PyObject*) {
  PyObject* self = type->tp_alloc(type, 0);
  if (self == nullptr) return nullptr;
  auto* m = reinterpret_cast<StepMethodObject*>(self);
  m->vectorcall = step_method_call;
  m->general = nullptr;
  m->which = StepCall::kUpdate;
  m->dict = nullptr;
  return self;
}

// __init__(general, which)
int step_method_init(PyObject* self, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"general", "which", nullptr};
  PyObject* general = nullptr;
  const char* which = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Os", const_cast<char**>(keywords), &general, &which)) return -1;
  const std::string name(which);
  if (!PyCallable_Check(general) || (name != "weights" && name != "update")) {
    PyErr_SetString(PyExc_ValueError, "StepMethod(general, which): a callable, and 'weights' or 'update'");
    return -1;
  }
  auto* m = reinterpret_cast<StepMethodObject*>(self);
  Py_XSETREF(m->general, Py_NewRef(general));
  m->which = name == "weights" ? StepCall::kWeights : StepCall::kUpdate;
  return 0;
}

PyMethodDef step_method_init_def = {
    "__init__", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(init_method<step_method_init>)),
    METH_VARARGS | METH_KEYWORDS,
    "__init__(self: isample._core.StepMethod, general: object, which: str) -> None\n\n`general`: the Python "
    "function; `which`: 'weights' or 'update'."};

void step_method_dealloc(PyObject* self) {
  auto* m = reinterpret_cast<StepMethodObject*>(self);
  Py_XDECREF(m->general);
  Py_XDECREF(m->dict);
  PyTypeObject* type = Py_TYPE(self);
  type->tp_free(self);
  Py_DECREF(type);
}

// Read from the class: the method itself; from a sampler: bound to it (as functions are).
PyObject* step_method_get(PyObject* self, PyObject* instance, PyObject*) {
  if (instance == nullptr || instance == Py_None) return Py_NewRef(self);
  return PyMethod_New(self, instance);
}

// Pickled (and copied) by its module and qualified name, as the function it stands for.
PyObject* step_method_reduce(PyObject* self, PyObject*) { return PyObject_GetAttrString(self, "__qualname__"); }

PyMethodDef step_method_methods[] = {
    {"__reduce__", step_method_reduce, METH_NOARGS, "__reduce__(self: isample._core.StepMethod) -> str"},
    {nullptr, nullptr, 0, nullptr},
};

PyMemberDef step_method_members[] = {
    {"__dictoffset__", T_PYSSIZET, offsetof(StepMethodObject, dict), READONLY, nullptr},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(StepMethodObject, vectorcall), READONLY, nullptr},
    {nullptr, 0, 0, 0, nullptr},
};

PyGetSetDef step_method_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, nullptr, nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

py::object make_step_method_type() {
  static PyType_Slot slots[] = {
      {Py_tp_getset, step_method_getset},
      {Py_tp_new, reinterpret_cast<void*>(step_method_new)},
      {Py_tp_init, reinterpret_cast<void*>(step_method_init)},
      {Py_tp_dealloc, reinterpret_cast<void*>(step_method_dealloc)},
      {Py_tp_call, reinterpret_cast<void*>(PyVectorcall_Call)},
      {Py_tp_descr_get, reinterpret_cast<void*>(step_method_get)},
      {Py_tp_members, step_method_members},
      {Py_tp_methods, step_method_methods},
      {Py_tp_doc, const_cast<char*>(
                      "StepMethod(general, which): EpochSampler.weights ('weights') or .update ('update') as a method "
                      "that calls the sampler's compiled step first and the Python function `general` otherwise.")},
      {0, nullptr},
  };
  static PyType_Spec spec = {"isample._core.StepMethod", sizeof(StepMethodObject), 0,
                             Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_VECTORCALL | Py_TPFLAGS_METHOD_DESCRIPTOR, slots};
  return make_type(spec, &step_method_init_def);
}

int cuda_devices() {
#if defined(ISAMPLE_HAVE_CUDA)
  return cuda_device_count();
#else
  return 0;
#endif
}

// A comma-separated list from CMake ("75,80,90") as ["sm_75", "sm_80", "sm_90"].
py::list prefixed(const std::string& text, const std::string& prefix) {
  py::list items;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find(',', start);
    if (end == std::string::npos) end = text.size();
    items.append(prefix + text.substr(start, end - start));
    start = end + 1;
  }
  return items;
}

// A device tree: "cuda" (on GPU `device`) or "host" (the GPU algorithms on the CPU).
std::unique_ptr<DeviceTreeApi> make_device_tree(const std::string& kind, int64_t capacity, bool softmax,
                                                double temperature, int device) {
  if (capacity < 1 || capacity > kMaxCapacity) {
    throw std::invalid_argument("capacity must be between 1 and 2^40, got " + std::to_string(capacity));
  }
  if (!(temperature > 0.0 && temperature <= std::numeric_limits<double>::max())) {
    throw std::invalid_argument("temperature must be a finite number > 0");
  }
  if (kind == "host") {
#if defined(ISAMPLE_HAVE_GPU_ON_HOST)
    return make_host_gpu_tree(capacity, softmax, temperature);
#else
    throw std::invalid_argument("this build of isample has no host build of the GPU algorithms");
#endif
  }
  if (kind == "cuda") {
#if defined(ISAMPLE_HAVE_CUDA)
    if (device < 0 || device >= cuda_device_count()) {
      const std::string error = cuda_status().error;
      throw std::invalid_argument("CUDA device " + std::to_string(device) + " is not available (" +
                                  std::to_string(cuda_device_count()) + " visible" +
                                  (error.empty() ? "" : "; the CUDA runtime says " + error) + ")");
    }
    return make_cuda_tree(capacity, softmax, temperature, device);
#else
    (void)device;
    throw std::invalid_argument("this build of isample has no CUDA back end");
#endif
  }
  throw std::invalid_argument("unknown device tree kind '" + kind + "'");
}

SumTree& sum_tree(SumHandle& h) { return h.tree; }
SumTree& sum_tree(SoftmaxHandle& h) { return h.tree.tree(); }

// Methods that both trees share, reading through to the underlying SumTree.
template <class H>
void bind_common(py::class_<H>& cls) {
  cls.def_property_readonly("capacity", [](H& h) { return h.tree.capacity(); })
      .def_property_readonly("num_positive", [](H& h) { return sum_tree(h).num_positive(); },
                             "Number of items with positive probability.")
      .def_property_readonly("nbytes", [](H& h) { return h.tree.nbytes(); },
                             "Bytes held by the tree's arrays.")
      .def_property_readonly("levels", [](H& h) { return sum_tree(h).layout().levels; })
      .def_property(
          "stream_seed", [](H& h) { return h.stream_seed; },
          [](H& h, uint64_t seed) { h.locked(0, [&] { h.stream_seed = seed; }); })
      .def_property(
          "stream_calls", [](H& h) { return h.stream_calls; },
          [](H& h, uint64_t calls) { h.locked(0, [&] { h.stream_calls = calls; }); })
      .def(
          "probability",
          [](H& h, uintptr_t indices, int64_t k, uintptr_t out) {
            h.locked(k, [&] { sum_tree(h).probability(as_pointer<const int64_t>(indices), k, as_pointer<double>(out)); });
          },
          py::arg("indices"), py::arg("k"), py::arg("out"))
      .def(
          "sample_from_uniforms",
          [](H& h, uintptr_t u, int64_t k, uintptr_t out) {
            h.locked(k, [&] {
              sum_tree(h).sample_from_uniforms(as_pointer<const double>(u), k, as_pointer<int64_t>(out));
            });
          },
          py::arg("u"), py::arg("k"), py::arg("out"))
      .def(
          "sample",
          [](H& h, int64_t k, bool replace, uintptr_t out, std::optional<uint64_t> seed, const std::string& method) {
            DistinctMethod how = distinct_method(method);
            h.locked(replace ? k : h.tree.capacity(), [&] {
              uint64_t key = h.key_of(seed);
              if (replace) {
                sum_tree(h).sample_with_replacement(key, k, as_pointer<int64_t>(out));
              } else {
                sum_tree(h).sample_without_replacement(key, k, as_pointer<int64_t>(out), how);
              }
              h.advance(seed);
            });
          },
          py::arg("k"), py::arg("replace"), py::arg("out"), py::arg("seed") = py::none(), py::arg("method") = "auto",
          "k draws into out; with seed=None from the tree's own stream (advancing it).")
      .def(
          "sample_with_inclusion",
          [](H& h, int64_t k, uintptr_t out, uintptr_t inclusion, std::optional<uint64_t> seed) {
            h.locked(h.tree.capacity(), [&] {
              sum_tree(h).sample_with_inclusion(h.key_of(seed), k, as_pointer<int64_t>(out), as_pointer<double>(inclusion));
              h.advance(seed);
            });
          },
          py::arg("k"), py::arg("out"), py::arg("inclusion"), py::arg("seed") = py::none(),
          "k distinct items by the exponential race, with their inclusion probabilities.")
      .def(
          "sample_tensor",
          [](H& h, py::handle k_object, py::handle replace_object, py::handle seed_object,
             py::handle method_object) -> py::object {
            const bool replace = replace_object.ptr() == Py_True;
            if (!arrays.makes_tensors() || (!replace && replace_object.ptr() != Py_False)) return py::none();
            int64_t k = 0;
            std::optional<uint64_t> seed;
            const int64_t limit = replace ? kFastDrawLimit : std::min(kFastDrawLimit, h.tree.capacity());
            if (!plain_count(k_object, limit, k) || !plain_seed(seed_object, seed)) return py::none();
            DistinctMethod how = DistinctMethod::kAuto;
            PyObject* method = method_object.ptr();
            if (!PyUnicode_CheckExact(method)) return py::none();
            if (PyUnicode_CompareWithASCIIString(method, "race") == 0) {
              how = DistinctMethod::kRace;
            } else if (PyUnicode_CompareWithASCIIString(method, "removal") == 0) {
              how = DistinctMethod::kRemoval;
            } else if (PyUnicode_CompareWithASCIIString(method, "auto") != 0) {
              return py::none();
            }
            if (replace && how != DistinctMethod::kAuto) return py::none();
            void* data = nullptr;
            py::object out = py::reinterpret_steal<py::object>(arrays.new_tensor(k, ElementType::kInt64, data));
            if (!out) throw py::error_already_set();
            int64_t* drawn = static_cast<int64_t*>(data);
            h.locked(replace ? k : h.tree.capacity(), [&] {
              uint64_t key = h.key_of(seed);
              if (replace) {
                sum_tree(h).sample_with_replacement(key, k, drawn);
              } else {
                sum_tree(h).sample_without_replacement(key, k, drawn, how);
              }
              h.advance(seed);
            });
            return out;
          },
          py::arg("k"), py::arg("replace"), py::arg("seed"), py::arg("method"),
          "sample() into a new int64 tensor, or None for arguments the Python layer must check.")
      .def(
          "get_tensor",
          [](H& h, py::handle indices) -> py::object {
            ArrayView i;
            if (!arrays.makes_tensors() || !int64_array(indices, i)) return py::none();
            void* data = nullptr;
            py::object out = py::reinterpret_steal<py::object>(arrays.new_tensor(i.length, ElementType::kFloat64, data));
            if (!out) throw py::error_already_set();
            h.locked(i.length, [&] { h.tree.get(static_cast<const int64_t*>(i.data), i.length, static_cast<double*>(data)); });
            return out;
          },
          py::arg("indices"), "get() into a new float64 tensor for plain int64 indices; None for anything else.")
      .def(
          "probability_tensor",
          [](H& h, py::handle indices) -> py::object {
            ArrayView i;
            if (!arrays.makes_tensors() || !int64_array(indices, i)) return py::none();
            void* data = nullptr;
            py::object out = py::reinterpret_steal<py::object>(arrays.new_tensor(i.length, ElementType::kFloat64, data));
            if (!out) throw py::error_already_set();
            h.locked(i.length, [&] {
              sum_tree(h).probability(static_cast<const int64_t*>(i.data), i.length, static_cast<double*>(data));
            });
            return out;
          },
          py::arg("indices"), "probability() into a new float64 tensor for plain int64 indices; None for anything else.")
      .def(
          "export_leaves",
          [](H& h, uintptr_t out) {
            h.locked(h.tree.capacity(), [&] {
              const SumTree& t = sum_tree(h);
              std::copy(t.leaves(), t.leaves() + t.capacity(), as_pointer<double>(out));
            });
          },
          py::arg("out"), "Copy the n leaf weights into out.");
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "isample's compiled core: float64 sum trees with exact sums.";
  py::register_exception<OutOfMemory>(m, "OutOfMemory", PyExc_MemoryError);

  m.def("fanout", [] { return kFanout; });
  m.def("_set_parallel_blocks", &set_parallel_blocks, py::arg("blocks"),
        "Split builds between two threads from this many blocks of 16 items on; returns the previous "
        "value (tests).");
  m.def("cuda_device_count", &cuda_devices,
        "CUDA devices visible to this build (0 without CUDA, or when its CUDA runtime cannot start: "
        "cuda_status() says why, e.g. a driver older than the runtime).");
  m.def(
      "build_info",
      [] {
        py::dict info;
#if defined(ISAMPLE_HAVE_CUDA)
        info["cuda"] = true;
        info["cuda_archs"] = prefixed(ISAMPLE_CUDA_SASS, "sm_");      // machine code
        info["cuda_ptx"] = prefixed(ISAMPLE_CUDA_PTX, "compute_");    // PTX, compiled by the driver
        info["cuda_runtime"] = ISAMPLE_CUDA_RUNTIME;  // linked statically: 13000 is CUDA 13.0
#else
        info["cuda"] = false;
        info["cuda_archs"] = py::list();
        info["cuda_ptx"] = py::list();
        info["cuda_runtime"] = 0;
#endif
#if defined(ISAMPLE_HAVE_GPU_ON_HOST)
        info["gpu_on_host"] = true;
#else
        info["gpu_on_host"] = false;
#endif
        info["fanout"] = kFanout;
        info["compiler"] = std::string(__VERSION__);
        info["cpu_kernels"] = std::string(cpu_kernels().name);
        return info;
      },
      "How this extension was built.");
  m.def(
      "cuda_status",
      [] {
        py::dict result;
#if defined(ISAMPLE_HAVE_CUDA)
        CudaStatus status = cuda_status();
        result["runtime_version"] = status.runtime_version;
        result["driver_version"] = status.driver_version;
        result["error"] = status.error;
        py::list devices;
        for (const CudaDevice& d : status.devices) {
          py::dict device;
          device["name"] = d.name;
          device["capability"] = py::make_tuple(d.major, d.minor);
          device["multiprocessors"] = d.multiprocessors;
          device["total_memory"] = d.total_memory;
          devices.append(device);
        }
        result["devices"] = devices;
#else
        result["runtime_version"] = 0;
        result["driver_version"] = 0;
        result["error"] = std::string("this build of isample has no CUDA back end");
        result["devices"] = py::list();
#endif
        return result;
      },
      "The CUDA runtime's and driver's versions (1000 * major + 10 * minor; 0: none), the error "
      "that kept the runtime from listing devices ('' if none), and each visible device's name, "
      "compute capability, multiprocessors and memory. Launches and allocates nothing.");
  m.def(
      "cuda_memory_pool",
      [](int device, bool reset_peaks) {
        py::dict result;
#if defined(ISAMPLE_HAVE_CUDA)
        if (device < 0 || device >= cuda_device_count()) {
          throw std::invalid_argument("CUDA device " + std::to_string(device) + " is not available");
        }
        CudaPoolStats stats = cuda_memory_pool(device, reset_peaks);
        result["reserved"] = stats.reserved;
        result["reserved_peak"] = stats.reserved_peak;
        result["used"] = stats.used;
        result["used_peak"] = stats.used_peak;
#else
        (void)device;
        (void)reset_peaks;
        throw std::invalid_argument("this build of isample has no CUDA back end");
#endif
        return result;
      },
      py::arg("device"), py::arg("reset_peaks") = false,
      "Bytes of the device's default memory pool (where device trees allocate): reserved and "
      "used, now and at their peak since the last reset_peaks=True.");
  m.def(
      "exp_shared",
      [](uintptr_t x, int64_t n, uintptr_t out) {
        const double* in = as_pointer<const double>(x);
        double* o = as_pointer<double>(out);
        for (int64_t j = 0; j < n; ++j) o[j] = exp_shared(in[j]);
      },
      py::arg("x"), py::arg("n"), py::arg("out"),
      "out[j] = e^x[j] by the exp that the CPU and GPU trees share (for tests).");
  m.def(
      "select_cpu_kernels",
      [](const std::string& name) {
        if (!select_cpu_kernels(name.c_str())) {
          throw std::invalid_argument("CPU kernels '" + name + "' are not available on this machine");
        }
      },
      py::arg("name"), "Use the 'generic' or 'avx2' build of the CPU kernels (for tests).");
  m.def(
      "gather",
      [](uintptr_t source, int64_t n, uintptr_t indices, int64_t k, uintptr_t out) {
        const double* src = as_pointer<const double>(source);
        const int64_t* idx = as_pointer<const int64_t>(indices);
        double* o = as_pointer<double>(out);
        for (int64_t j = 0; j < k; ++j) {
          if (idx[j] < 0 || idx[j] >= n) {
            throw std::out_of_range("index " + std::to_string(idx[j]) + " is out of range for " + std::to_string(n) + " items");
          }
          o[j] = src[idx[j]];
        }
        for (int64_t j = 0; j < k; ++j) {
          if (o[j] != o[j]) return j;
        }
        return int64_t(-1);
      },
      py::arg("source"), py::arg("n"), py::arg("indices"), py::arg("k"), py::arg("out"),
      "out[j] = source[indices[j]] (float64); returns the first j where that is NaN, else -1.");
  m.def(
      "configure_arrays",
      [](py::handle tensor_type, py::handle array_type, py::handle float64, py::handle float32, py::handle cpu) {
        arrays.configure(tensor_type.ptr(), array_type.ptr());
        arrays.configure_names(float64.ptr(), float32.ptr(), cpu.ptr());
        return arrays.makes_tensors();
      },
      py::arg("tensor_type"), py::arg("array_type"), py::arg("float64") = py::none(), py::arg("float32") = py::none(),
      py::arg("cpu") = py::none(),
      "Read tensor_type (torch.Tensor) objects through DLPack's C exchange API and array_type "
      "(numpy.ndarray) through the buffer protocol on the fast paths; float64, float32 and cpu are "
      "the objects (torch.float64, torch.float32, torch.device('cpu')) the fast paths take for "
      "dtype and device. True when tensors can also be made there.");
  m.def(
      "take_rows",
      [](py::sequence sources, py::handle indices) -> py::object {
        ArrayView i;
        if (!arrays.makes_tensors() || !int64_array(indices, i)) return py::none();
        struct Source {
          const char* data;
          int64_t rows;
          size_t row_bytes;
          dlpack::Tensor description;
        };
        std::vector<Source> plain(size_t(py::len(sources)));
        for (size_t s = 0; s < plain.size(); ++s) {
          const void* data = nullptr;
          if (!arrays.rows(py::handle(sources[s]).ptr(), data, plain[s].rows, plain[s].row_bytes, plain[s].description)) {
            return py::none();
          }
          plain[s].data = static_cast<const char*>(data);
        }
        const int64_t k = i.length;
        const int64_t* index = static_cast<const int64_t*>(i.data);
        for (const Source& source : plain) {
          for (int64_t j = 0; j < k; ++j) {
            if (index[j] < 0 || index[j] >= source.rows) {
              throw std::out_of_range("index " + std::to_string(index[j]) + " is out of range for " +
                                      std::to_string(source.rows) + " rows");
            }
          }
        }
        py::list out;
        for (const Source& source : plain) {
          std::vector<int64_t> dims(source.description.shape, source.description.shape + source.description.ndim);
          dims[0] = k;
          void* data = nullptr;
          py::object taken = py::reinterpret_steal<py::object>(
              arrays.new_tensor(source.description.dtype, source.description.ndim, dims.data(), data));
          if (!taken) throw py::error_already_set();
          char* to = static_cast<char*>(data);
          for (int64_t j = 0; j < k; ++j) std::memcpy(to + size_t(j) * source.row_bytes, source.data + size_t(index[j]) * source.row_bytes, source.row_bytes);
          out.append(taken);
        }
        return std::move(out);
      },
      py::arg("sources"), py::arg("indices"),
      "[s[indices] for s in sources]: rows of C-contiguous CPU tensors (any shape, any non-complex "
      "dtype) as new tensors, for plain int64 indices; None when any argument is not plain.");
  m.def(
      "replay_weights",
      [](py::handle leaves, double beta, int normalize, double reference) -> py::object {
        ArrayView l;
        if (!arrays.makes_tensors() || !arrays.view(leaves.ptr(), l) || l.type != ElementType::kFloat64 || normalize < 0 ||
            normalize > 2) {
          return py::none();
        }
        void* data = nullptr;
        py::object out = py::reinterpret_steal<py::object>(arrays.new_tensor(l.length, ElementType::kFloat32, data));
        if (!out) throw py::error_already_set();
        importance_weights(static_cast<const double*>(l.data), l.length, beta, Normalize(normalize), reference,
                           static_cast<float*>(data));
        return out;
      },
      py::arg("leaves"), py::arg("beta"), py::arg("normalize"), py::arg("reference"),
      "A replay buffer's importance weights of items with these positive leaves (plain float64 CPU "
      "array), as ReplayStore.sample_into computes them (normalize 0: none, `reference` = size / "
      "total; 1: batch; 2: buffer, `reference` = the smallest positive leaf); float32 tensor, or None.");
  m.def(
      "proportional_leaves",
      [](uintptr_t scores, int64_t n, double alpha, double eps, uintptr_t out) {
        proportional_leaves(as_pointer<const double>(scores), n, alpha, eps, as_pointer<double>(out));
      },
      py::arg("scores"), py::arg("n"), py::arg("alpha"), py::arg("eps"), py::arg("out"),
      "out = (max(scores, 0) + eps) ** alpha, the Proportional transform's leaves (float64).");
  m.def(
      "uniforms",
      [](uint64_t seed, uint64_t offset, int64_t k, uintptr_t out) {
        double* o = as_pointer<double>(out);
        uint64_t key = key_from_seed(seed);
        for (int64_t j = 0; j < k; ++j) o[j] = uniform_at(key, offset + uint64_t(j));
      },
      py::arg("seed"), py::arg("offset"), py::arg("k"), py::arg("out"),
      "The uniforms that sample(k, seed=seed) descends from, starting at stream position offset.");

  py::class_<DeviceHandle> device_tree(m, "DeviceTree",
      "A SumTree or SoftmaxTree run by the GPU algorithms: on a CUDA device, or built for the CPU "
      "(kind 'host'). Array addresses are in the tree's memory; stream is a cudaStream_t as an int.");
  device_tree
      .def(py::init([](uint64_t stream_seed, const std::string& kind, int64_t capacity, bool softmax,
                       double temperature, int device) {
             return std::make_unique<DeviceHandle>(stream_seed, make_device_tree(kind, capacity, softmax, temperature, device));
           }),
           py::arg("stream_seed"), py::arg("kind"), py::arg("capacity"), py::arg("softmax"),
           py::arg("temperature") = 1.0, py::arg("device") = 0)
      .def_property_readonly("capacity", [](DeviceHandle& h) { return h.tree->capacity(); })
      .def_property_readonly("softmax", [](DeviceHandle& h) { return h.tree->softmax(); })
      .def_property_readonly("levels", [](DeviceHandle& h) { return h.tree->levels(); })
      .def_property_readonly("nbytes", [](DeviceHandle& h) { return h.tree->nbytes(); })
      .def_property_readonly("scratch_nbytes", [](DeviceHandle& h) { return h.tree->scratch_nbytes(); },
                             "Bytes of scratch the tree holds between calls.")
      .def_property(
          "stream_seed", [](DeviceHandle& h) { return h.stream_seed; },
          [](DeviceHandle& h, uint64_t seed) { h.locked(0, [&] { h.stream_seed = seed; }); })
      .def_property(
          "stream_calls", [](DeviceHandle& h) { return h.stream_calls; },
          [](DeviceHandle& h, uint64_t calls) { h.locked(0, [&] { h.stream_calls = calls; }); })
      .def(
          "update",
          [](DeviceHandle& h, uintptr_t indices, uintptr_t values, int64_t k, double keep, uintptr_t stream) {
            h.locked(k, [&] { h.tree->update(as_pointer<const int64_t>(indices), as_pointer<const double>(values), k, keep, stream); });
          },
          py::arg("indices"), py::arg("values"), py::arg("k"), py::arg("keep") = 0.0, py::arg("stream") = 0)
      .def(
          "assign",
          [](DeviceHandle& h, uintptr_t values, uintptr_t stream) {
            h.locked(h.tree->capacity(), [&] { h.tree->assign(as_pointer<const double>(values), stream); });
          },
          py::arg("values"), py::arg("stream") = 0)
      .def(
          "load",
          [](DeviceHandle& h, uintptr_t scores, double reference, uintptr_t stream) {
            h.locked(h.tree->capacity(), [&] { h.tree->load(as_pointer<const double>(scores), reference, stream); });
          },
          py::arg("scores"), py::arg("reference"), py::arg("stream") = 0)
      .def(
          "set_temperature",
          [](DeviceHandle& h, double temperature, uintptr_t stream) {
            h.locked(h.tree->capacity(), [&] { h.tree->set_temperature(temperature, stream); });
          },
          py::arg("temperature"), py::arg("stream") = 0)
      .def(
          "get",
          [](DeviceHandle& h, uintptr_t indices, int64_t k, uintptr_t out, uintptr_t stream) {
            h.locked(k, [&] { h.tree->get(as_pointer<const int64_t>(indices), k, as_pointer<double>(out), stream); });
          },
          py::arg("indices"), py::arg("k"), py::arg("out"), py::arg("stream") = 0)
      .def(
          "probability",
          [](DeviceHandle& h, uintptr_t indices, int64_t k, uintptr_t out, uintptr_t stream) {
            h.locked(k, [&] { h.tree->probability(as_pointer<const int64_t>(indices), k, as_pointer<double>(out), stream); });
          },
          py::arg("indices"), py::arg("k"), py::arg("out"), py::arg("stream") = 0)
      .def(
          "sample_from_uniforms",
          [](DeviceHandle& h, uintptr_t u, int64_t k, uintptr_t out, uintptr_t stream) {
            h.locked(k, [&] { h.tree->sample_from_uniforms(as_pointer<const double>(u), k, as_pointer<int64_t>(out), stream); });
          },
          py::arg("u"), py::arg("k"), py::arg("out"), py::arg("stream") = 0)
      .def(
          "sample",
          [](DeviceHandle& h, int64_t k, bool replace, uintptr_t out, std::optional<uint64_t> seed,
             const std::string& method, uintptr_t stream, bool check) {
            DistinctMethod how = distinct_method(method);
            if (!replace && how == DistinctMethod::kRemoval) {
              throw std::invalid_argument("method='removal' is CPU-only: device trees draw distinct items by the race");
            }
            h.locked(replace ? k : h.tree->capacity(), [&] {
              uint64_t key = h.key_of(seed);
              if (replace) {
                h.tree->sample(key, k, as_pointer<int64_t>(out), stream);
              } else {
                h.tree->sample_distinct(key, k, as_pointer<int64_t>(out), nullptr, stream);
              }
              // Checked under the lock, before the stream moves: a draw the device rejected
              // (an all-zero tree, too few positive items) must leave stream_calls as it was.
              if (check) h.tree->check(stream);
              h.advance(seed);
            });
          },
          py::arg("k"), py::arg("replace"), py::arg("out"), py::arg("seed") = py::none(), py::arg("method") = "auto",
          py::arg("stream") = 0, py::arg("check") = false,
          "k draws into out. check=True raises the device's errors before the stream advances; "
          "without it (the no-sync path) a draw the device rejects still advances the stream.")
      .def(
          "sample_with_inclusion",
          [](DeviceHandle& h, int64_t k, uintptr_t out, uintptr_t inclusion, std::optional<uint64_t> seed, uintptr_t stream,
             bool check) {
            h.locked(h.tree->capacity(), [&] {
              h.tree->sample_distinct(h.key_of(seed), k, as_pointer<int64_t>(out), as_pointer<double>(inclusion), stream);
              if (check) h.tree->check(stream);
              h.advance(seed);
            });
          },
          py::arg("k"), py::arg("out"), py::arg("inclusion"), py::arg("seed") = py::none(), py::arg("stream") = 0,
          py::arg("check") = false)
      .def(
          "status",
          [](DeviceHandle& h, uintptr_t stream) {
            DeviceTreeApi::Status st = h.locked(0, [&] { return h.tree->status(stream); });
            py::dict d;
            d["total"] = st.total;
            d["reference"] = st.reference;
            d["temperature"] = st.temperature;
            d["positive"] = st.positive;
            return d;
          },
          py::arg("stream") = 0, "Total, reference, temperature and positive count (synchronises).")
      .def(
          "check",
          [](DeviceHandle& h, uintptr_t stream) { h.locked(0, [&] { h.tree->check(stream); }); },
          py::arg("stream") = 0, "Raise the first error recorded on the device since the last check.");

  py::class_<SumHandle> sum(m, "SumTree", "Sum tree over non-negative float64 weights.");
  sum.def(py::init<uint64_t, int64_t>(), py::arg("stream_seed"), py::arg("capacity"))
      .def_property_readonly("total", [](SumHandle& h) { return h.tree.total(); })
      .def(
          "update",
          [](SumHandle& h, uintptr_t indices, uintptr_t weights, int64_t k) {
            h.locked(k, [&] { h.tree.update(as_pointer<const int64_t>(indices), as_pointer<const double>(weights), k); });
          },
          py::arg("indices"), py::arg("weights"), py::arg("k"))
      .def(
          "update_arrays",
          [](SumHandle& h, py::handle indices, py::handle weights) {
            ArrayView i, w;
            if (!int64_array(indices, i) || !real_array(weights, i.length, w)) return false;
            h.locked(i.length, [&] {
              h.tree.update(static_cast<const int64_t*>(i.data), as_doubles(w, h.values_scratch), i.length);
            });
            return true;
          },
          py::arg("indices"), py::arg("weights"),
          "update() for a plain int64 and a float64/float32 CPU array of one length; False (nothing "
          "done) for anything else.")
      .def(
          "sample_with_weights_tensor",
          [](SumHandle& h, py::handle k_object, py::handle seed_object) -> py::object {
            int64_t k = 0;
            std::optional<uint64_t> seed;
            if (!arrays.makes_tensors() || !plain_count(k_object, kFastDrawLimit, k) || !plain_seed(seed_object, seed)) {
              return py::none();
            }
            void *drawn = nullptr, *leaves = nullptr;
            py::object out = py::reinterpret_steal<py::object>(arrays.new_tensor(k, ElementType::kInt64, drawn));
            if (!out) throw py::error_already_set();
            py::object weights = py::reinterpret_steal<py::object>(arrays.new_tensor(k, ElementType::kFloat64, leaves));
            if (!weights) throw py::error_already_set();
            h.locked(k, [&] {
              int64_t* index = static_cast<int64_t*>(drawn);
              h.tree.sample_with_replacement(h.key_of(seed), k, index);
              h.tree.get(index, k, static_cast<double*>(leaves));
              h.advance(seed);
            });
            return py::make_tuple(out, weights);
          },
          py::arg("k"), py::arg("seed"),
          "sample(k) and the drawn items' weights, as two new tensors; None for arguments the Python "
          "layer must check.")
      .def(
          "assign",
          [](SumHandle& h, uintptr_t weights) {
            h.locked(h.tree.capacity(), [&] { h.tree.assign(as_pointer<const double>(weights)); });
          },
          py::arg("weights"), "Set all n weights.")
      .def(
          "get",
          [](SumHandle& h, uintptr_t indices, int64_t k, uintptr_t out) {
            h.locked(k, [&] { h.tree.get(as_pointer<const int64_t>(indices), k, as_pointer<double>(out)); });
          },
          py::arg("indices"), py::arg("k"), py::arg("out"));
  sum.def("track_min", [](SumHandle& h) { h.locked(h.tree.capacity(), [&] { h.tree.track_min(); }); },
          "Keep the smallest positive weight from now on (a min over children beside the sums).")
      .def_property_readonly("tracks_min", [](SumHandle& h) { return h.tree.tracks_min(); })
      .def_property_readonly("min_positive", [](SumHandle& h) { return h.locked(0, [&] { return h.tree.min_positive(); }); },
                             "The smallest positive weight (inf when none); needs track_min().");
  bind_common(sum);

  m.add_object("ReplayStore", make_replay_store_type());
  m.add_object("SamplerLock", make_sampler_lock_type());
  m.add_object("SamplerStep", make_sampler_step_type());
  m.add_object("StepMethod", make_step_method_type());

  py::class_<SoftmaxHandle> softmax(m, "SoftmaxTree", "Scores s with p = softmax(s / T).");
  softmax.def(py::init<uint64_t, int64_t, double>(), py::arg("stream_seed"), py::arg("capacity"), py::arg("temperature"))
      .def_property_readonly("total", [](SoftmaxHandle& h) { return h.tree.tree().total(); },
                             "Sum of the leaves exp((s - reference) / T).")
      .def_property_readonly("log_total", [](SoftmaxHandle& h) { return h.tree.log_total(); })
      .def_property_readonly("reference", [](SoftmaxHandle& h) { return h.tree.reference(); })
      .def_property(
          "temperature", [](SoftmaxHandle& h) { return h.tree.temperature(); },
          [](SoftmaxHandle& h, double t) { h.locked(h.tree.capacity(), [&] { h.tree.set_temperature(t); }); })
      .def(
          "update",
          [](SoftmaxHandle& h, uintptr_t indices, uintptr_t scores, int64_t k, double keep) {
            h.locked(k, [&] { h.tree.update(as_pointer<const int64_t>(indices), as_pointer<const double>(scores), k, keep); });
          },
          py::arg("indices"), py::arg("scores"), py::arg("k"), py::arg("keep") = 0.0,
          "s <- keep * s_before + (1 - keep) * scores at the indices.")
      .def(
          "update_arrays",
          [](SoftmaxHandle& h, py::handle indices, py::handle scores, double keep) {
            ArrayView i, s;
            if (!int64_array(indices, i) || !real_array(scores, i.length, s)) return false;
            h.locked(i.length, [&] {
              h.tree.update(static_cast<const int64_t*>(i.data), as_doubles(s, h.values_scratch), i.length, keep);
            });
            return true;
          },
          py::arg("indices"), py::arg("scores"), py::arg("keep") = 0.0,
          "update() for a plain int64 and a float64/float32 CPU array of one length; False (nothing "
          "done) for anything else.")
      .def(
          "assign",
          [](SoftmaxHandle& h, uintptr_t scores) {
            h.locked(h.tree.capacity(), [&] { h.tree.assign(as_pointer<const double>(scores)); });
          },
          py::arg("scores"), "Set all n scores.")
      .def(
          "get",
          [](SoftmaxHandle& h, uintptr_t indices, int64_t k, uintptr_t out) {
            h.locked(k, [&] { h.tree.get(as_pointer<const int64_t>(indices), k, as_pointer<double>(out)); });
          },
          py::arg("indices"), py::arg("k"), py::arg("out"))
      .def(
          "export_scores",
          [](SoftmaxHandle& h, uintptr_t out) {
            h.locked(h.tree.capacity(), [&] {
              std::copy(h.tree.scores(), h.tree.scores() + h.tree.capacity(), as_pointer<double>(out));
            });
          },
          py::arg("out"))
      .def(
          "load",
          [](SoftmaxHandle& h, uintptr_t scores, double reference) {
            h.locked(h.tree.capacity(), [&] { h.tree.load(as_pointer<const double>(scores), reference); });
          },
          py::arg("scores"), py::arg("reference"), "Restore scores and reference exactly.");
  bind_common(softmax);
}
