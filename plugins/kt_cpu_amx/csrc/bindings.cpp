// Python bindings. Tensors cross as (address, sizes): this module never links against torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_features.h"
#include "decoder.h"
#include "engine.h"
#include "iq.h"
#include "pack.h"

namespace py = pybind11;
using namespace kt;

namespace kt { void bind_host_launch(py::module_& m); }  // host_launch.cpp

template <class T> static T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// A property reading and writing an enum field by name.
template <class C, class E>
static void enum_property(py::class_<C, std::shared_ptr<C>>& cls, const char* name, E C::*field,
                          std::vector<std::pair<std::string, E>> names) {
    cls.def_property(
        name,
        [field, names](const C& c) {
            for (const auto& [n, v] : names)
                if (c.*field == v) return n;
            return std::string("?");
        },
        [field, names, name](C& c, const std::string& s) {
            std::string known;
            for (const auto& [n, v] : names) {
                if (n == s) { c.*field = v; return; }
                known += (known.empty() ? "" : ", ") + n;
            }
            throw std::invalid_argument(std::string("kt_cpu_amx: unknown ") + name + " '" + s + "' (" + known + ")");
        });
}

PYBIND11_MODULE(_kernels, m) {
    m.doc() = "kt_cpu_amx CPU kernels: quantized linear and fused MoE experts";

    m.def("cpu_features", [] {
        const CpuFeatures& f = cpu_features();
        py::dict d;
        d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512vl"] = f.avx512vl;
        d["avx512vnni"] = f.avx512vnni; d["avx512bf16"] = f.avx512bf16;
        d["amx_tile"] = f.amx_tile; d["amx_int8"] = f.amx_int8; d["amx_bf16"] = f.amx_bf16;
        d["amx_permitted"] = f.amx_permitted;
        return d;
    });
    m.def("isa_unavailable_reason", &isa_unavailable_reason, py::arg("isa"));
    m.def("exact_bits_for", &exact_bits_for, py::arg("ggml_type"));
    m.def("iq_types", [] {
        std::vector<std::string> out;
        for (int t = 1; t < IQ_COUNT; ++t) out.push_back(kIqInfo[t].name);
        return out;
    }, "The GGML types kept as their GGUF blocks and decoded by the kernels (the i-quants, MXFP4, IQ4_NL, TQ2_0).");
    m.def("set_iq_table", [](const std::string& name, py::bytes data) {
        const std::string b = data;
        set_iq_table(name, reinterpret_cast<const int8_t*>(b.data()), b.size());
    }, py::arg("name"), py::arg("data"), "Install an i-quant lookup table (int8 values; runtime.kernels() does).");
    m.def("iq_decode_blocks", [](const std::string& type, uintptr_t raw, int nblocks, uintptr_t q, uintptr_t scales) {
        const int t = iq_type_for(type);
        if (!t) throw std::invalid_argument("kt_cpu_amx: " + type + " is not an i-quant type");
        const int B = kIqInfo[t].block;
        for (int b = 0; b < nblocks; ++b)
            iq_decode_block(t, ptr<const uint8_t>(raw) + size_t(b) * kIqInfo[t].type_size, ptr<int8_t>(q) + size_t(B) * b,
                            ptr<float>(scales) + size_t(B / 16) * b);
    }, py::arg("ggml_type"), py::arg("raw_ptr"), py::arg("nblocks"), py::arg("q_ptr"), py::arg("scales_ptr"),
       "Decode nblocks blocks of B weights (256; MXFP4, IQ4_NL: 32) into int8 q [nblocks, B] and float scales\n"
       "[nblocks, B / 16] (weight = scale * q).");
#ifdef KT_HAVE_NUMA
    m.attr("numa") = true;
#else
    m.attr("numa") = false;
#endif

    py::class_<PackedMatrix, std::shared_ptr<PackedMatrix>>(m, "PackedMatrix")
        .def_static("from_gguf", [](const std::string& type, uintptr_t raw, int n, int k, std::shared_ptr<Runtime> rt) {
            auto p = std::make_shared<PackedMatrix>();
            py::gil_scoped_release nogil;
            pack_gguf(*p, type, ptr<const uint8_t>(raw), n, k, rt ? &rt->pool() : nullptr);
            return p;
        }, py::arg("ggml_type"), py::arg("raw_ptr"), py::arg("n"), py::arg("k"), py::arg("runtime") = py::none(),
           "Repack n rows of k weights of GGUF blocks, on the runtime's threads if given (the same bytes either way).")
        .def_static("from_float", [](uintptr_t w, int n, int k, int bits, std::shared_ptr<Runtime> rt) {
            auto p = std::make_shared<PackedMatrix>();
            py::gil_scoped_release nogil;
            pack_float(*p, ptr<const float>(w), n, k, bits, rt ? &rt->pool() : nullptr);
            return p;
        }, py::arg("w_ptr"), py::arg("n"), py::arg("k"), py::arg("bits"), py::arg("runtime") = py::none())
        .def("unpack", [](const PackedMatrix& p, uintptr_t out) {
            py::gil_scoped_release nogil;
            unpack_to_float(p, ptr<float>(out));
        }, py::arg("out_ptr"), "Expand to float32 [n, k] at out_ptr.")
        .def("buffers", [](const PackedMatrix& p) {
            py::dict d;
            const std::pair<const char*, const Buffer*> bufs[] = {
                {"qs", &p.qs}, {"scales", &p.scales}, {"mins", &p.mins}, {"sup_scales", &p.sup_scales},
                {"sup_mins", &p.sup_mins}};
            for (const auto& [name, b] : bufs) d[name] = py::bytes(static_cast<const char*>(b->ptr), b->bytes);
            return d;
        }, "The packed bytes by buffer (qs, scales, mins, sup_scales, sup_mins), for tests that compare packings.")
        .def_readonly("n", &PackedMatrix::n)
        .def_readonly("k", &PackedMatrix::k)
        .def_readonly("bits", &PackedMatrix::bits)
        .def_readonly("group", &PackedMatrix::group)
        .def_readonly("half_scales", &PackedMatrix::half_scales)
        .def_readonly("sub8_scales", &PackedMatrix::sub8_scales)
        .def_readonly("sub16_scales", &PackedMatrix::sub16_scales)
        .def_readonly("zero_point", &PackedMatrix::zero_point, "0, or the zero point replacing the mins")
        .def_property_readonly("iq_type", [](const PackedMatrix& p) { return std::string(kIqInfo[p.iq].name); },
                               "The i-quant kept as GGUF blocks, or ''")
        .def_property_readonly("nbytes", &PackedMatrix::nbytes);

    py::class_<MoeLayer, std::shared_ptr<MoeLayer>>(m, "MoeLayer")
        .def(py::init([](std::vector<std::shared_ptr<PackedMatrix>> gate, std::vector<std::shared_ptr<PackedMatrix>> up,
                         std::vector<std::shared_ptr<PackedMatrix>> down, const std::string& act) {
            if (gate.empty() || gate.size() != up.size() || gate.size() != down.size())
                throw std::invalid_argument("kt_cpu_amx: gate, up and down need one matrix per expert each");
            auto L = std::make_shared<MoeLayer>();
            int I = gate[0]->n, H = gate[0]->k;
            for (size_t e = 0; e < gate.size(); ++e)
                if (gate[e]->n != I || gate[e]->k != H || up[e]->n != I || up[e]->k != H || down[e]->n != H ||
                    down[e]->k != I)
                    throw std::invalid_argument("kt_cpu_amx: expert " + std::to_string(e) + " has mismatched shapes");
            if (H % 32 || I % 32)
                throw std::invalid_argument("kt_cpu_amx: hidden and intermediate sizes must be multiples of 32");
            L->gate = std::move(gate); L->up = std::move(up); L->down = std::move(down);
            if (act == "silu") L->act = Activation::Silu;
            else if (act == "gelu_tanh") L->act = Activation::GeluTanh;
            else throw std::invalid_argument("kt_cpu_amx: unsupported activation '" + act + "' (silu, gelu_tanh)");
            return L;
        }), py::arg("gate"), py::arg("up"), py::arg("down"), py::arg("act") = "silu")
        .def_property_readonly("experts", &MoeLayer::experts)
        .def_property_readonly("hidden", &MoeLayer::hidden)
        .def_property_readonly("inter", &MoeLayer::inter)
        .def_property_readonly("expert_nbytes", [](const MoeLayer& L) {
            return L.gate[0]->nbytes() + L.up[0]->nbytes() + L.down[0]->nbytes();
        }, "Bytes of one expert's packed gate, up and down weights.");

    py::class_<Runtime, std::shared_ptr<Runtime>>(m, "Runtime")
        .def(py::init<int, const std::string&, bool>(), py::arg("threads"), py::arg("isa"), py::arg("pin") = true)
        .def_property_readonly("isa", &Runtime::isa_name)
        .def_property_readonly("threads", &Runtime::threads)
        .def_readwrite("amx_min_rows", &Runtime::amx_min_rows)
        .def_readwrite("amx_min_expert_rows", &Runtime::amx_min_expert_rows)
        .def_readwrite("decode_rows", &Runtime::decode_rows)
        .def_readwrite("decode_spin_us", &Runtime::decode_spin_us)
        .def_readwrite("act_residual", &Runtime::act_residual)
        .def("linear", [](std::shared_ptr<Runtime> rt, std::shared_ptr<PackedMatrix> W, int M, uintptr_t x, uintptr_t y,
                          bool exact) {
            if (W->k % 32) throw std::invalid_argument("kt_cpu_amx: linear input size must be a multiple of 32");
            py::gil_scoped_release nogil;
            Runtime* r = rt.get();
            rt->pool().run([&] {
                Runtime::Timed timed(r, Phase::Dense);
                r->linear(*W, M, ptr<const float>(x), ptr<float>(y), exact);
            });
        }, py::arg("weight"), py::arg("m"), py::arg("x_ptr"), py::arg("y_ptr"), py::arg("exact") = false,
           "y[m, n] = x[m, k] @ weight.T (float32 buffers); runs on the calling thread and the pool, blocks.")
        .def("linear_multi", [](std::shared_ptr<Runtime> rt, std::vector<std::shared_ptr<PackedMatrix>> W, int M,
                                uintptr_t x, std::vector<uintptr_t> y) {
            if (W.empty() || W.size() != y.size())
                throw std::invalid_argument("kt_cpu_amx: linear_multi needs one output per matrix");
            std::vector<const PackedMatrix*> ws;
            std::vector<float*> ys;
            for (size_t i = 0; i < W.size(); ++i) {
                if (W[i]->k != W[0]->k || W[i]->k % 32)
                    throw std::invalid_argument("kt_cpu_amx: linear_multi matrices need one input size, a multiple of 32");
                ws.push_back(W[i].get());
                ys.push_back(ptr<float>(y[i]));
            }
            py::gil_scoped_release nogil;
            Runtime* r = rt.get();
            rt->pool().run([&] {
                Runtime::Timed timed(r, Phase::Dense);
                r->linear_multi(ws, M, ptr<const float>(x), ys);
            });
        }, py::arg("weights"), py::arg("m"), py::arg("x_ptr"), py::arg("y_ptrs"),
           "y_ptrs[i][m, n_i] = x[m, k] @ weights[i].T, the input quantized once, one parallel phase.")
        .def("moe", [](std::shared_ptr<Runtime> rt, std::shared_ptr<MoeLayer> L, int T, int K, uintptr_t x,
                       uintptr_t idx, uintptr_t w, uintptr_t out) {
            py::gil_scoped_release nogil;
            Runtime* r = rt.get();
            rt->pool().run([&] {
                Runtime::Timed timed(r, Phase::Experts);
                r->moe(*L, T, K, ptr<const float>(x), ptr<const int64_t>(idx), ptr<const float>(w), ptr<float>(out));
            });
        }, py::arg("layer"), py::arg("t"), py::arg("k"), py::arg("x_ptr"), py::arg("idx_ptr"), py::arg("w_ptr"),
           py::arg("out_ptr"), "moe_submit + sync in one call, run on the calling thread and the pool.")
        .def("moe_submit", [](std::shared_ptr<Runtime> rt, std::shared_ptr<MoeLayer> L, int T, int K, uintptr_t x,
                              uintptr_t idx, uintptr_t w, uintptr_t out) {
            py::gil_scoped_release nogil;
            Runtime* r = rt.get();  // Python keeps the runtime alive; the job must not own it
            rt->pool().submit([r, L, T, K, x, idx, w, out] {
                r->moe(*L, T, K, ptr<const float>(x), ptr<const int64_t>(idx), ptr<const float>(w), ptr<float>(out));
            });
        }, py::arg("layer"), py::arg("t"), py::arg("k"), py::arg("x_ptr"), py::arg("idx_ptr"), py::arg("w_ptr"),
           py::arg("out_ptr"),
           "Start out[t, h] = sum_k w[t, k] * expert_idx[t, k](x[t]) on the pool and return at once; the buffers "
           "must stay alive until sync().")
        .def("decoder_step", [](std::shared_ptr<Runtime> rt, const std::vector<std::shared_ptr<DecoderLayer>>& layers,
                                uintptr_t x, uintptr_t cos, uintptr_t sin, int pos) {
            std::vector<const DecoderLayer*> ls;
            for (const auto& L : layers) {
                if (!L->k_cache || !L->v_cache) throw std::invalid_argument("kt_cpu_amx: decoder layer without a cache");
                ls.push_back(L.get());
            }
            py::gil_scoped_release nogil;
            Runtime* r = rt.get();
            rt->pool().run([&] { r->decoder_step(ls, ptr<float>(x), ptr<const float>(cos), ptr<const float>(sin), pos); });
        }, py::arg("layers"), py::arg("x_ptr"), py::arg("cos_ptr"), py::arg("sin_ptr"), py::arg("pos"),
           "One decode step of one sequence through the layers: x[hidden] updated in place, keys and values written "
           "at pos in each layer's cache; blocks.")
        .def("decoder_step_batch", [](std::shared_ptr<Runtime> rt,
                                      const std::vector<std::shared_ptr<DecoderLayer>>& layers, int batch, uintptr_t x,
                                      uintptr_t cos, uintptr_t sin, uintptr_t positions, uintptr_t blocks, int width,
                                      int block) {
            std::vector<const DecoderLayer*> ls;
            for (const auto& L : layers) {
                if (!L->k_cache || !L->v_cache) throw std::invalid_argument("kt_cpu_amx: decoder layer without a cache");
                ls.push_back(L.get());
            }
            py::gil_scoped_release nogil;
            Runtime* r = rt.get();
            rt->pool().run([&] {
                r->decoder_step_batch(ls, batch, ptr<float>(x), ptr<const float>(cos), ptr<const float>(sin),
                                      ptr<const int32_t>(positions), ptr<const int32_t>(blocks), width, block);
            });
        }, py::arg("layers"), py::arg("batch"), py::arg("x_ptr"), py::arg("cos_ptr"), py::arg("sin_ptr"),
           py::arg("positions_ptr"), py::arg("blocks_ptr"), py::arg("width"), py::arg("block"),
           "One decode step of `batch` sequences: x[batch, hidden] updated in place; cos/sin [batch, head_dim]; "
           "positions int32 [batch]; blocks int32 [batch, width] of pool blocks of `block` slots (0: the layers' "
           "cache pointers hold one sequence from slot 0); blocks.")
        .def_readwrite("latent_split_from", &Runtime::latent_split_from,
                       "The fused decoder's latent attention over at least this many positions is split by positions "
                       "and latent columns instead of by head (engine.h); the same floats.")
        .def_property("i8_min_rows", [](std::shared_ptr<Runtime> rt) { return rt->i8_min_rows; },
                      [](std::shared_ptr<Runtime> rt, int v) { rt->i8_min_rows = v; },
                      "Int8-activation GEMMs of at least this many rows run on the int8 tile kernel (engine.h).")
        .def("profile", [](std::shared_ptr<Runtime> rt) {
            std::vector<double> p = rt->profile();
            py::dict d;
            const char* names[] = {"dense", "experts", "attention", "small", "waiting"};
            for (size_t i = 0; i < p.size(); ++i) d[names[i]] = p[i];
            return d;
        }, "Seconds of blocking calls on the calling thread since reset_profile(): dense linears, routed experts, "
           "attention, small ops (norms, residuals, routing), and the pool's barrier waits (left out of the others).")
        .def("reset_profile", [](std::shared_ptr<Runtime> rt) { rt->reset_profile(); })
        .def_property_readonly("parallel_phases", [](std::shared_ptr<Runtime> rt) { return rt->pool().phases(); },
                               "Parallel phases (barriers) the pool has run since it started.")
        .def("sync", [](std::shared_ptr<Runtime> rt) {
            py::gil_scoped_release nogil;
            rt->pool().sync();
        })
        .def_property_readonly("busy", [](std::shared_ptr<Runtime> rt) { return rt->pool().busy(); });
    py::class_<DecoderLayer, std::shared_ptr<DecoderLayer>> decoder_layer(m, "DecoderLayer");
    enum_property(decoder_layer, "kind", &DecoderLayer::kind,
                  {{"gqa", AttentionKind::Gqa}, {"mla", AttentionKind::Mla}});
    enum_property(decoder_layer, "act", &DecoderLayer::act,
                  {{"silu", Activation::Silu}, {"gelu_tanh", Activation::GeluTanh}});
    decoder_layer
        .def(py::init<>())
        .def_readwrite("q", &DecoderLayer::q).def_readwrite("k", &DecoderLayer::k)
        .def_readwrite("v", &DecoderLayer::v).def_readwrite("o", &DecoderLayer::o)
        .def_readwrite("gate", &DecoderLayer::gate).def_readwrite("up", &DecoderLayer::up)
        .def_readwrite("down", &DecoderLayer::down)
        .def_readwrite("bq", &DecoderLayer::bq).def_readwrite("bk", &DecoderLayer::bk)
        .def_readwrite("bv", &DecoderLayer::bv).def_readwrite("bo", &DecoderLayer::bo)
        .def_readwrite("bgate", &DecoderLayer::bgate).def_readwrite("bup", &DecoderLayer::bup)
        .def_readwrite("bdown", &DecoderLayer::bdown)
        .def_readwrite("attn_norm", &DecoderLayer::attn_norm).def_readwrite("mlp_norm", &DecoderLayer::mlp_norm)
        .def_readwrite("q_norm", &DecoderLayer::q_norm).def_readwrite("k_norm", &DecoderLayer::k_norm)
        .def_readwrite("eps", &DecoderLayer::eps).def_readwrite("qk_eps", &DecoderLayer::qk_eps)
        .def_readwrite("scaling", &DecoderLayer::scaling)
        .def_readwrite("heads", &DecoderLayer::heads).def_readwrite("kv_heads", &DecoderLayer::kv_heads)
        .def_readwrite("head_dim", &DecoderLayer::head_dim)
        .def_readwrite("wkt", &DecoderLayer::wkt).def_readwrite("kv_norm", &DecoderLayer::kv_norm)
        .def_readwrite("kv_eps", &DecoderLayer::kv_eps).def_readwrite("nope", &DecoderLayer::nope)
        .def_readwrite("rope_dim", &DecoderLayer::rope_dim).def_readwrite("v_dim", &DecoderLayer::v_dim)
        .def_readwrite("rank", &DecoderLayer::rank).def_readwrite("experts", &DecoderLayer::experts)
        .def_readwrite("router", &DecoderLayer::router).def_readwrite("top_k", &DecoderLayer::top_k)
        .def_readwrite("routed_scale", &DecoderLayer::routed_scale)
        .def("check", &DecoderLayer::check, "Empty when the shapes agree, else what is wrong.")
        .def("set_cache", [](DecoderLayer& L, uintptr_t k, uintptr_t v, int capacity) {
            L.k_cache = ptr<float>(k); L.v_cache = ptr<float>(v); L.capacity = capacity;
        }, py::arg("k_ptr"), py::arg("v_ptr"), py::arg("capacity"),
           "The cache decoder_step writes and reads (float32): keys and values [kv_heads, capacity, head_dim], or "
           "for latent attention latents [capacity, rank] and rotary keys [capacity, rope_dim].");
    bind_host_launch(m);
}
