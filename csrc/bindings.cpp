// Python bindings of attnkern's C++ CPU kernels: the module attnkern._C.
#include <torch/extension.h>

#include "gating.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnkern CPU kernels (pooled gating for CBAM, SE and BAM)";
  m.def("channel_stats", &attnkern::channel_stats, py::arg("x"),
        "mean, max and tie count of x over H*W per (b, c)");
  m.def("spatial_stats", &attnkern::spatial_stats, py::arg("x"), py::arg("gc"),
        "mean, max and tie count over C of x * gc per (b, hw)");
  m.def("gate_apply", &attnkern::gate_apply, py::arg("x"), py::arg("gc"), py::arg("gs"),
        "x * gc[b, c] * gs[b, hw]");
  m.def("gate_bwd_a", &attnkern::gate_bwd_a, py::arg("dout"), py::arg("x"), py::arg("gc"),
        py::arg("gs"), py::arg("need_dgc"), py::arg("need_dgs"), "gate gradients (pass A)");
  m.def("cbam_bwd_b", &attnkern::cbam_bwd_b, py::arg("x"), py::arg("gc"), py::arg("smax"),
        py::arg("scount"), py::arg("dsmean"), py::arg("dsmax"),
        "channel-gate gradient through the spatial statistics (pass B)");
  m.def("gate_bwd_c", &attnkern::gate_bwd_c, py::arg("x"), py::arg("dout"), py::arg("gc"),
        py::arg("gs"), py::arg("smax"), py::arg("scount"), py::arg("dsmean"), py::arg("dsmax"),
        py::arg("cmax"), py::arg("ccount"), py::arg("dcmean"), py::arg("dcmax"),
        "input gradient of a gating block (pass C)");
  m.def("bam_combine", &attnkern::bam_combine, py::arg("x"), py::arg("mc"), py::arg("ms"),
        py::arg("product"), "x * (1 + sigmoid(mc + ms)) (or mc * ms)");
  m.def("bam_combine_bwd", &attnkern::bam_combine_bwd, py::arg("dout"), py::arg("x"),
        py::arg("mc"), py::arg("ms"), py::arg("product"), "logit gradients of BAM's combine");
  m.def("bam_dx", &attnkern::bam_dx, py::arg("x"), py::arg("dout"), py::arg("mc"),
        py::arg("ms"), py::arg("product"), py::arg("dcmean"),
        "input gradient of BAM's combine plus the mean-pool term");
}
