// Placeholder module: the NCCL communicator lands here.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_nccl, m) {
  m.doc() = "pycfg NCCL extension";
  m.def("built", []() { return true; });
}
