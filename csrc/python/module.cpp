// The Python module mackay_ext._C (setup.py build only; the CMake library has no Python).
// Importing it loads this shared library, which runs the TORCH_LIBRARY registrations; the
// module itself is empty: the ops live in torch.ops.mackay_ext.
#include <Python.h>

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
