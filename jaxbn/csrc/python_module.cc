// The Python module: a dict of the XLA FFI handlers (defined in kernels.cc)
// and what they were built against.
#include <Python.h>

#include <utility>

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxbnMoments);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxbnGradSums);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxbnInputGrad);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxbnNormalize);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxbnBackward);


// ------------------------------------------------------- Python module

namespace {

PyObject* Handlers(PyObject*, PyObject*) {
  PyObject* handlers = PyDict_New();
  if (handlers == nullptr) return nullptr;
  const std::pair<const char*, void*> entries[] = {
      {"jaxbn_moments", reinterpret_cast<void*>(JaxbnMoments)},
      {"jaxbn_grad_sums", reinterpret_cast<void*>(JaxbnGradSums)},
      {"jaxbn_input_grad", reinterpret_cast<void*>(JaxbnInputGrad)},
      {"jaxbn_backward", reinterpret_cast<void*>(JaxbnBackward)},
      {"jaxbn_normalize", reinterpret_cast<void*>(JaxbnNormalize)},
  };
  for (const auto& [name, fn] : entries) {
    PyObject* capsule = PyCapsule_New(fn, nullptr, nullptr);
    if (capsule == nullptr || PyDict_SetItemString(handlers, name, capsule)) {
      Py_XDECREF(capsule);
      Py_DECREF(handlers);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return handlers;
}

#ifndef JAXBN_BUILT_WITH_JAXLIB
#define JAXBN_BUILT_WITH_JAXLIB "unknown"
#endif

// What the kernels were compiled against: jaxbn registers them only with a
// jaxlib whose XLA FFI accepts that API version.
PyObject* BuildInfo(PyObject*, PyObject*) {
  return Py_BuildValue("{s:(ii),s:s}", "ffi_api", XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR,
                       "jaxlib", JAXBN_BUILT_WITH_JAXLIB);
}

PyMethodDef kMethods[] = {
    {"handlers", Handlers, METH_NOARGS,
     "{target name: XLA FFI handler capsule} for the CPU kernels."},
    {"build_info", BuildInfo, METH_NOARGS,
     "{'ffi_api': (major, minor), 'jaxlib': version} the kernels were built with."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_cpu_kernels",
                       "jaxbn's XLA FFI CPU kernels.", -1, kMethods};

}  // namespace

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&kModule); }
