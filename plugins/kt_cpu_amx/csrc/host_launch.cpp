// Host functions that a CUDA stream (or a captured CUDA graph) calls to run one MoE layer's routed experts
// on the pool, so a decode step can enqueue them without Python and without a host-side wait:
//   copy hidden/ids/weights to pinned buffers -> launch kt_moe_launch_submit -> GPU work (shared experts)
//   -> launch kt_moe_launch_sync -> copy the pinned output back.
// Both have the signature of a CUDA host function (void(void*)), so this file needs no CUDA header; the
// Python side launches them with cuLaunchHostFunc. A host function must not throw or call CUDA: errors of
// the experts' job are kept here and reported by host_launch_error().
#include <pybind11/pybind11.h>

#include <memory>
#include <mutex>
#include <string>

#include "engine.h"

namespace py = pybind11;

namespace kt {

// Everything one layer's job needs, at addresses that stay fixed for the life of the object.
struct MoeLaunch {
    std::shared_ptr<Runtime> rt;
    std::shared_ptr<MoeLayer> layer;
    int T = 0, K = 0;
    const float* x = nullptr;
    const int64_t* idx = nullptr;
    const float* w = nullptr;
    float* out = nullptr;
};

static std::mutex error_mu;
static std::string first_error;

static void keep_error(const std::string& what) {
    std::lock_guard<std::mutex> l(error_mu);
    if (first_error.empty()) first_error = what;
}

}  // namespace kt

extern "C" {

void kt_moe_launch_submit(void* data) {
    auto* L = static_cast<kt::MoeLaunch*>(data);
    try {
        // The job must not own the runtime (its pool runs the job); the MoeLaunch keeps both alive.
        kt::Runtime* r = L->rt.get();
        std::shared_ptr<kt::MoeLayer> layer = L->layer;
        int T = L->T, K = L->K;
        const float *x = L->x, *w = L->w;
        const int64_t* idx = L->idx;
        float* out = L->out;
        r->pool().submit([r, layer, T, K, x, idx, w, out] { r->moe(*layer, T, K, x, idx, w, out); });
    } catch (const std::exception& e) {
        kt::keep_error(std::string("kt_cpu_amx: experts submit failed: ") + e.what());
    } catch (...) {
        kt::keep_error("kt_cpu_amx: experts submit failed");
    }
}

void kt_moe_launch_sync(void* data) {
    auto* L = static_cast<kt::MoeLaunch*>(data);
    try {
        L->rt->pool().sync();
    } catch (const std::exception& e) {
        kt::keep_error(std::string("kt_cpu_amx: experts job failed: ") + e.what());
    } catch (...) {
        kt::keep_error("kt_cpu_amx: experts job failed");
    }
}

}  // extern "C"

namespace kt {

void bind_host_launch(py::module_& m) {
    py::class_<MoeLaunch, std::shared_ptr<MoeLaunch>>(m, "MoeLaunch",
        "One layer's routed-experts job over fixed buffers, for kt_moe_launch_submit/kt_moe_launch_sync "
        "(``address`` is their user-data argument).")
        .def(py::init([](std::shared_ptr<Runtime> rt, std::shared_ptr<MoeLayer> layer, int T, int K, uintptr_t x,
                         uintptr_t idx, uintptr_t w, uintptr_t out) {
            if (T < 1 || K < 1) throw std::invalid_argument("kt_cpu_amx: MoeLaunch needs t >= 1 and k >= 1");
            auto L = std::make_shared<MoeLaunch>();
            L->rt = std::move(rt); L->layer = std::move(layer); L->T = T; L->K = K;
            L->x = reinterpret_cast<const float*>(x); L->idx = reinterpret_cast<const int64_t*>(idx);
            L->w = reinterpret_cast<const float*>(w); L->out = reinterpret_cast<float*>(out);
            return L;
        }), py::arg("runtime"), py::arg("layer"), py::arg("t"), py::arg("k"), py::arg("x_ptr"), py::arg("idx_ptr"),
            py::arg("w_ptr"), py::arg("out_ptr"))
        .def_property_readonly("address", [](MoeLaunch& L) { return reinterpret_cast<uintptr_t>(&L); })
        .def_readonly("t", &MoeLaunch::T)
        .def_readonly("k", &MoeLaunch::K)
        .def("submit", [](MoeLaunch& L) {
            py::gil_scoped_release nogil;
            kt_moe_launch_submit(&L);
        }, "Call the submit host function here (what a stream would call).")
        .def("sync", [](MoeLaunch& L) {
            py::gil_scoped_release nogil;
            kt_moe_launch_sync(&L);
        }, "Call the sync host function here (what a stream would call).");
    m.attr("moe_launch_submit_fn") = reinterpret_cast<uintptr_t>(&kt_moe_launch_submit);
    m.attr("moe_launch_sync_fn") = reinterpret_cast<uintptr_t>(&kt_moe_launch_sync);
    m.def("host_launch_error", [] {
        std::lock_guard<std::mutex> l(error_mu);
        std::string e;
        e.swap(first_error);
        return e;
    }, "The first error a host function met since the last call ('' if none), and clear it.");
}

}  // namespace kt
