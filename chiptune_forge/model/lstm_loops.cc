// The LSTM layer's recurrent loops for training, forward and backward through time, as plain C++.
//
// TensorFlow runs each step of a loop as a handful of separate kernels whose fixed costs exceed the
// step's arithmetic at these sizes (a 32 x 128 by 128 x 512 product per row group). Here a step is one
// pass over blocks of a few rows: the block's product is made in registers and left in the first-level
// cache, the gates are applied to it there, and the results are written once. Rows are independent
// sequences, so each thread runs its own rows through every step; a row's arithmetic does not depend on
// how rows are split between threads, and the bias gradient is summed over fixed groups of rows, so
// results are the same on any number of cores.
//
// Layouts (time-major, row-major, float32): xproj [T, B, 4U] (input projections without bias, gates
// i, f, g, o as Keras orders them), recurrent [U, 4U], hs [T, B, U]; derivs [T, B, 4U] holds per gate the
// derivative of the gate times what it multiplies, cell [T, B, 2U] holds o * tanh'(c) and f: what the
// backward loop needs. U must be a multiple of 16.
//
// Built by chiptune_forge/model/native.py with the machine's own C++ compiler on first use.

#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <cstdint>
#include <cstring>
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
constexpr int SPLIT = 4;   // rows are shared between threads, and the bias gradient summed, in groups of 4

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

// out[r][q*NR .. q*NR+NR) = a[r][0..K) @ panel q, for R <= MR rows.
template <int R>
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
        store(out[r] + q * NR, acc[r][0]);
        store(out[r] + q * NR + W, acc[r][1]);
    }
}

// out[r] = a[r][0..K) @ the packed [K, N] matrix, for any number of rows. Panel by panel: one panel
// (K x NR floats) and the rows' inputs stay in the first-level cache while every row uses them.
void product(int rows, const float* const* a, int K, int N, const float* panels, float* const* out) {
    const int blocks = (rows + MR - 1) / MR;  // of equal size, as near MR as can be
    for (int q = 0; q < N / NR; ++q) {
        const float* w = panels + static_cast<size_t>(q) * K * NR;
        for (int k = 0; k < blocks; ++k) {
            const int r0 = rows * k / blocks, n = rows * (k + 1) / blocks - r0;
            switch (n) {
                case 6: block<6>(a + r0, K, w, out + r0, q); break;
                case 5: block<5>(a + r0, K, w, out + r0, q); break;
                case 4: block<4>(a + r0, K, w, out + r0, q); break;
                case 3: block<3>(a + r0, K, w, out + r0, q); break;
                case 2: block<2>(a + r0, K, w, out + r0, q); break;
                default: block<1>(a + r0, K, w, out + r0, q); break;
            }
        }
    }
}

struct Forward {
    int T, B, U;
    const float* xproj;
    const float* bias;
    const float* panels;  // recurrent [U, 4U]
    float* hs;
    float* derivs;
    float* cell;
};

// Rows [b_first, b_last) through every step, in blocks of at most MR rows whose product stays in the
// first-level cache (z) for the gates that follow it.
template <bool Stream>
void forward_rows(const Forward& f, int b_first, int b_last) {
    const int U = f.U, n = b_last - b_first, blocks = (n + MR - 1) / MR;
    std::vector<float> c_state(static_cast<size_t>(n) * U, 0.0f), z(static_cast<size_t>(MR) * 4 * U, 0.0f);
    float* out[MR];
    for (int r = 0; r < MR; ++r) out[r] = &z[static_cast<size_t>(r) * 4 * U];
    const vf one = splat(1.0f);
    for (int t = 0; t < f.T; ++t)
        for (int k = 0; k < blocks; ++k) {
            const int r0 = n * k / blocks, rows = n * (k + 1) / blocks - r0;
            if (t > 0) {
                const float* h[MR];
                for (int r = 0; r < rows; ++r) h[r] = f.hs + (static_cast<size_t>(t - 1) * f.B + b_first + r0 + r) * U;
                product(rows, h, U, 4 * U, f.panels, out);
            }
            for (int r = 0; r < rows; ++r) {
                const size_t row = static_cast<size_t>(t) * f.B + b_first + r0 + r;
                const float* x = f.xproj + row * 4 * U;
                const float* zr = out[r];
                float* cs = &c_state[static_cast<size_t>(r0 + r) * U];
                float* d = f.derivs + row * 4 * U;
                float* e = f.cell + row * 2 * U;
                for (int j = 0; j < U; j += W) {
                    for (int gate = 0; gate < 4; ++gate) __builtin_prefetch(x + 4 * U + gate * U + j);  // next row
                    const vf i = sigmoid(load(zr + j) + load(x + j) + load(f.bias + j));
                    const vf fg = sigmoid(load(zr + U + j) + load(x + U + j) + load(f.bias + U + j));
                    const vf g = tanh_v(load(zr + 2 * U + j) + load(x + 2 * U + j) + load(f.bias + 2 * U + j));
                    const vf o = sigmoid(load(zr + 3 * U + j) + load(x + 3 * U + j) + load(f.bias + 3 * U + j));
                    const vf c_prev = load(cs + j);
                    const vf c = fg * c_prev + i * g;
                    const vf tc = tanh_v(c);
                    store(cs + j, c);
                    store(f.hs + row * U + j, o * tc);
                    record<Stream>(d + j, g * i * (one - i));
                    record<Stream>(d + U + j, c_prev * fg * (one - fg));
                    record<Stream>(d + 2 * U + j, i * (one - g * g));
                    record<Stream>(d + 3 * U + j, tc * o * (one - o));
                    record<Stream>(e + j, o * (one - tc * tc));
                    record<Stream>(e + U + j, fg);
                }
            }
        }
#if defined(__AVX__)
    if (Stream) _mm_sfence();  // streamed stores are weakly ordered: make them visible before the thread ends
#endif
}

struct Backward {
    int T, B, U;
    const float* dhs;
    const float* derivs;
    const float* cell;
    const float* panels;  // recurrent^T [4U, U]
    float* dz;
    float* dbias;  // [groups, 4U]: each group of SPLIT rows' sum over its rows and steps
};

// Rows [b_first, b_last) back through every step, in blocks of at most MR rows: a block's gate gradients,
// then, while they are in cache, the product that carries them to the step before.
void backward_rows(const Backward& g, int b_first, int b_last) {
    const int U = g.U, n = b_last - b_first, blocks = (n + MR - 1) / MR;
    std::vector<float> dh_next(static_cast<size_t>(n) * U, 0.0f), dc_next(static_cast<size_t>(n) * U, 0.0f);
    std::memset(g.dbias + static_cast<size_t>(b_first / SPLIT) * 4 * U, 0,
                static_cast<size_t>((n + SPLIT - 1) / SPLIT) * 4 * U * sizeof(float));
    for (int t = g.T - 1; t >= 0; --t)
        for (int k = 0; k < blocks; ++k) {
            const int r0 = n * k / blocks, rows = n * (k + 1) / blocks - r0;
            const float* a[MR];
            float* out[MR];
            for (int r = 0; r < rows; ++r) {
                const size_t row = static_cast<size_t>(t) * g.B + b_first + r0 + r;
                float* sums = g.dbias + static_cast<size_t>((b_first + r0 + r) / SPLIT) * 4 * U;
                const float* e = g.cell + row * 2 * U;
                const float* d = g.derivs + row * 4 * U;
                float* z = g.dz + row * 4 * U;
                float* hn = &dh_next[static_cast<size_t>(r0 + r) * U];
                float* cn = &dc_next[static_cast<size_t>(r0 + r) * U];
                for (int j = 0; j < U; j += W) {
                    const vf dh = load(g.dhs + row * U + j) + load(hn + j);
                    const vf dc = load(cn + j) + dh * load(e + j);
                    const vf zi = dc * load(d + j), zf = dc * load(d + U + j);
                    const vf zg = dc * load(d + 2 * U + j), zo = dh * load(d + 3 * U + j);
                    store(z + j, zi);
                    store(z + U + j, zf);
                    store(z + 2 * U + j, zg);
                    store(z + 3 * U + j, zo);
                    store(sums + j, load(sums + j) + zi);
                    store(sums + U + j, load(sums + U + j) + zf);
                    store(sums + 2 * U + j, load(sums + 2 * U + j) + zg);
                    store(sums + 3 * U + j, load(sums + 3 * U + j) + zo);
                    store(cn + j, dc * load(e + U + j));
                }
                a[r] = z;
                out[r] = hn;
            }
            if (t > 0) product(rows, a, 4 * U, U, g.panels, out);
        }
}

// Rows of 4U and 2U floats keep an array's 32-byte alignment when U is a multiple of 16.
bool aligned(const float* p) { return reinterpret_cast<std::uintptr_t>(p) % 32 == 0; }

// Runs work(first row, last row) on `threads` threads, each given whole groups of SPLIT rows.
template <typename Work>
void in_threads(int rows, int threads, const Work& work) {
    const int groups = (rows + SPLIT - 1) / SPLIT;
    threads = threads < 1 ? 1 : (threads > groups ? groups : threads);
    auto bound = [&](int k) { const int b = groups * k / threads * SPLIT; return b < rows ? b : rows; };
    std::vector<std::thread> pool;
    for (int k = 1; k < threads; ++k) pool.emplace_back(work, bound(k), bound(k + 1));
    work(0, bound(1));
    for (auto& th : pool) th.join();
}

// The sizes the loops take; anything else returns -1 from the entry points, which then write nothing.
bool valid(int T, int B, int U) { return T > 0 && B > 0 && U > 0 && U % NR == 0; }

}  // namespace

extern "C" {

// Rows of the bias gradient's partial sums that lstm_backward writes for B rows.
int lstm_bias_blocks(int B) { return (B + SPLIT - 1) / SPLIT; }

// Hidden states and the backward pass's records of one layer from zero state; 0, or -1 for sizes it
// does not take.
int lstm_forward(int T, int B, int U, const float* xproj, const float* bias, const float* recurrent, float* hs,
                 float* derivs, float* cell, int threads) {
    if (!valid(T, B, U)) return -1;
    const std::vector<float> panels = pack(recurrent, U, 4 * U, false);
    const Forward f{T, B, U, xproj, bias, panels.data(), hs, derivs, cell};
    if (aligned(derivs) && aligned(cell))
        in_threads(B, threads, [&f](int first, int last) { forward_rows<true>(f, first, last); });
    else
        in_threads(B, threads, [&f](int first, int last) { forward_rows<false>(f, first, last); });
    return 0;
}

// Gradients of the gate pre-activations dz [T, B, 4U] and partial sums of them [lstm_bias_blocks(B), 4U]
// (the bias gradient is their sum), given the gradients of the hidden states and the forward loop's
// records. Each partial sum covers fixed rows, so the result does not depend on the number of threads.
// 0, or -1 for sizes it does not take.
int lstm_backward(int T, int B, int U, const float* dhs, const float* derivs, const float* cell,
                  const float* recurrent, float* dz, float* dbias, int threads) {
    if (!valid(T, B, U)) return -1;
    const std::vector<float> panels = pack(recurrent, 4 * U, U, true);
    const Backward g{T, B, U, dhs, derivs, cell, panels.data(), dz, dbias};
    in_threads(B, threads, [&g](int first, int last) { backward_rows(g, first, last); });
    return 0;
}

}
