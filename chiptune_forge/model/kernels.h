// Vector arithmetic and small matrix products shared by chiptune-forge's native training kernels
// (lstm_loops.cc, output_loss.cc), which native.py compiles into one library.
//
// Plain C++ with GCC/Clang vector extensions, 8 floats per vector; AVX2 intrinsics where the CPU has them.

#pragma once

#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <thread>
#include <vector>

namespace {

constexpr int W = 8;  // floats per vector
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef float vfu __attribute__((vector_size(W * sizeof(float)), aligned(4)));
typedef int vi __attribute__((vector_size(W * sizeof(int))));
typedef unsigned vu __attribute__((vector_size(W * sizeof(unsigned))));

inline vf load(const float* p) { return *reinterpret_cast<const vfu*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vfu*>(p) = v; }
// Stores a value that is read again only much later, past the caches (with Stream): bypassing them saves
// reading each line in before it is overwritten. Streaming needs 32-byte alignment, checked per array.
template <bool Stream>
inline void record(float* p, vf v) {
#if defined(__AVX__)
    if (Stream) {
        _mm256_stream_ps(p, v);
        return;
    }
#endif
    store(p, v);
}
inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x}; }
// Keeps two loaded vectors in registers: without this GCC reloads them as a memory operand of every
// multiply-add, which doubles the loads of the products' inner loops.
inline void in_register(vf& a, vf& b) {
#if defined(__AVX__)
    asm("" : "+x"(a), "+x"(b));
#endif
}
// Where mask (a vector comparison's all-ones or zero lanes) is set, a; elsewhere b.
inline vf select(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }
inline vf clamp(vf x, float lo, float hi) {
    x = select(x < splat(lo), splat(lo), x);
    return select(x > splat(hi), splat(hi), x);
}

// 1 / x: the hardware estimate refined by one Newton step (relative error about 1e-7) where there is one,
// since a vector division costs several times more and the loops divide five times per hidden unit.
inline vf reciprocal(vf x) {
#if defined(__AVX__)
    const vf y = _mm256_rcp_ps(x);
    return y * (splat(2.0f) - x * y);
#else
    return splat(1.0f) / x;
#endif
}

// e^x for |x| <= 87: 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, and a degree-6 Taylor polynomial
// for e^r (relative error below 2e-7). Adding 1.5 * 2^23 rounds x / ln 2 to the integer n and leaves n in
// the low mantissa bits, from where a shift moves it into the exponent of 2^n.
inline vf exp_v(vf x) {
    const vf magic = splat(12582912.0f);
    const vf shifted = x * splat(1.44269504f) + magic;
    const vf n = shifted - magic;
    vf r = x - n * splat(0.693145752f);
    r = r - n * splat(1.42860677e-6f);
    vf p = splat(1.0f / 720.0f);
    p = p * r + splat(1.0f / 120.0f);
    p = p * r + splat(1.0f / 24.0f);
    p = p * r + splat(1.0f / 6.0f);
    p = p * r + splat(0.5f);
    p = p * r + splat(1.0f);
    p = p * r + splat(1.0f);
    return p * (vf)(((vu)shifted << 23) + (127u << 23));
}

inline vf sigmoid(vf x) { return reciprocal(splat(1.0f) + exp_v(clamp(-x, -87.0f, 87.0f))); }

// tanh(x) = 2 sigmoid(2x) - 1 (absolute error about 2e-7).
inline vf tanh_v(vf x) { return splat(2.0f) * sigmoid(splat(2.0f) * x) - splat(1.0f); }

constexpr int NR = 2 * W;  // columns of a product block: two vectors
constexpr int MR = 6;      // rows of a product block: 6 x 2 accumulators, 2 panel vectors and 1 broadcast
                           // fill the 16 vector registers of AVX2

// A [K, N] matrix (or with `transpose`, the transpose of an [N, K] one) as N/NR panels of [K, NR], so that
// the products' inner loops read consecutive memory.
std::vector<float> pack(const float* m, int K, int N, bool transpose) {
    std::vector<float> out(static_cast<size_t>(K) * N);
    for (int q = 0; q < N / NR; ++q)
        for (int k = 0; k < K; ++k)
            for (int j = 0; j < NR; ++j)
                out[(static_cast<size_t>(q) * K + k) * NR + j] =
                    transpose ? m[static_cast<size_t>(q * NR + j) * K + k] : m[static_cast<size_t>(k) * N + q * NR + j];
    return out;
}

// out[r][q*NR .. q*NR+NR) = a[r][0..K) @ panel q (with Add, added to what is there), for R <= MR rows.
template <int R, bool Add>
void block(const float* const* a, int K, const float* w, float* const* out, int q) {
    vf acc[R][2] = {};
    for (int k = 0; k < K; ++k, w += NR) {
        vf w0 = load(w), w1 = load(w + W);
        in_register(w0, w1);
        for (int r = 0; r < R; ++r) {
            const vf x = splat(a[r][k]);
            acc[r][0] += x * w0;
            acc[r][1] += x * w1;
        }
    }
    for (int r = 0; r < R; ++r) {
        float* o = out[r] + q * NR;
        store(o, Add ? load(o) + acc[r][0] : acc[r][0]);
        store(o + W, Add ? load(o + W) + acc[r][1] : acc[r][1]);
    }
}

// out[r] = a[r][0..K) @ the packed [K, N] matrix (with Add, out[r] += it), for any number of rows. Panel by
// panel: one panel (K x NR floats) and the rows' inputs stay in the first-level cache while every row uses
// them.
template <bool Add = false>
void product(int rows, const float* const* a, int K, int N, const float* panels, float* const* out) {
    const int blocks = (rows + MR - 1) / MR;  // of equal size, as near MR as can be
    for (int q = 0; q < N / NR; ++q) {
        const float* w = panels + static_cast<size_t>(q) * K * NR;
        for (int k = 0; k < blocks; ++k) {
            const int r0 = rows * k / blocks, n = rows * (k + 1) / blocks - r0;
            switch (n) {
                case 6: block<6, Add>(a + r0, K, w, out + r0, q); break;
                case 5: block<5, Add>(a + r0, K, w, out + r0, q); break;
                case 4: block<4, Add>(a + r0, K, w, out + r0, q); break;
                case 3: block<3, Add>(a + r0, K, w, out + r0, q); break;
                case 2: block<2, Add>(a + r0, K, w, out + r0, q); break;
                default: block<1, Add>(a + r0, K, w, out + r0, q); break;
            }
        }
    }
}


// Arrays whose rows keep 32-byte alignment can be written with streaming stores.
inline bool aligned(const float* p) { return reinterpret_cast<std::uintptr_t>(p) % 32 == 0; }

// Runs work(first, last) over [0, items) on `threads` threads, each given whole groups of `group` items:
// results that are summed per group then do not depend on the number of threads.
template <typename Work>
void in_threads(int items, int group, int threads, const Work& work) {
    const int groups = (items + group - 1) / group;
    threads = threads < 1 ? 1 : (threads > groups ? groups : threads);
    auto bound = [&](int k) { const int b = groups * k / threads * group; return b < items ? b : items; };
    std::vector<std::thread> pool;
    for (int k = 1; k < threads; ++k) pool.emplace_back(work, bound(k), bound(k + 1));
    work(0, bound(1));
    for (auto& th : pool) th.join();
}

}  // namespace
