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
// i, f, g, o as Keras orders them; or the inputs [T, B, I] and their kernel, or event ids and a table: see
// Forward), keep [T, B] (0 where a sequence starts), recurrent [U, 4U], hs [T, B, U] (and out, the same
// after the layer's dropout, where it has one), h_prev (see Forward); derivs [T, B, 4U] holds per gate the derivative of the
// gate times what it multiplies, cell [T, B, 2U] holds o * tanh'(c) and f: what the backward loop needs.
// U (and I) must be multiples of 16.
//
// Built by chiptune_forge/model/native.py with the machine's own C++ compiler on first use.

#include <cstring>

#include "kernels.h"

namespace {

constexpr int SPLIT = 4;  // rows are shared between threads, and the bias gradient summed, in groups of 4

// Dropout of a layer's output: each value is kept where 16 random bits fall below `threshold` (out of
// 65536) and then scaled by `scale` (65536 / threshold). The bits of a value are a hash of the seed and
// the value's position, so the backward loop draws the same mask again instead of reading a stored one,
// and no thread's share of the rows changes another's.
struct Dropout {
    unsigned threshold;  // 0: no dropout
    float scale;
    unsigned seed0, seed1;
};

// The murmur3 finaliser: every input bit moves about half of the output bits.
inline vu mix(vu h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}

// The dropout factors (scale or 0) of the W values at flat position `at` (= (t * B + b) * U + j) on.
inline vf dropout_factors(const Dropout& d, unsigned at) {
    const vu lanes = vu{0, 1, 2, 3, 4, 5, 6, 7} + at;
    const vu bits = mix(mix(lanes ^ d.seed0) + d.seed1) & 0xffffu;
    return select((vi)(bits < d.threshold), splat(d.scale), splat(0.0f));
}

// Where a step's input projections come from: one of
// - xproj [T, B, 4U], computed beforehand;
// - ids [T, B] (int32) and table [events, 4U]: the projection of an event is a row of the table;
// - x [T, B, I] and its kernel (packed): the loop multiplies the inputs itself, block by block, so that
//   the projections never go to memory.
struct Forward {
    int T, B, U, I;
    const float* xproj;
    const int* ids;
    const float* table;
    const float* x;
    const float* panels_x;  // kernel [I, 4U]
    const float* keep;
    const float* bias;
    const float* panels;  // recurrent [U, 4U]
    float* hs;
    // Each step's previous hidden states (zero where a sequence starts), for the recurrent kernel's
    // gradient: [T, B, U]; with x, [T, B, I + U], each row the step's inputs and then those states, so
    // that one product over every step gives both kernels' gradients.
    float* h_prev;
    float* derivs;
    float* cell;
    Dropout dropout;
    float* out;  // with dropout: the hidden states after it (hs keeps them before, for the recurrence)
};

// Rows [b_first, b_last) through every step, in blocks of at most MR rows whose product stays in the
// first-level cache (z) for the gates that follow it.
template <bool Stream>
void forward_rows(const Forward& f, int b_first, int b_last) {
    const int U = f.U, n = b_last - b_first, blocks = (n + MR - 1) / MR;
    std::vector<float> c_state(static_cast<size_t>(n) * U, 0.0f), z(static_cast<size_t>(MR) * 4 * U, 0.0f);
    float* out[MR];
    for (int r = 0; r < MR; ++r) out[r] = &z[static_cast<size_t>(r) * 4 * U];
    const std::vector<float> zeros(4 * static_cast<size_t>(U), 0.0f);  // the state or projection of none
    const vf one = splat(1.0f);
    for (int t = 0; t < f.T; ++t)
        for (int k = 0; k < blocks; ++k) {
            const int r0 = n * k / blocks, rows = n * (k + 1) / blocks - r0;
            const size_t first = static_cast<size_t>(t) * f.B + b_first + r0;
            const size_t prev_width = U + (f.x ? f.I : 0);  // of an h_prev row, whose last U are the state
            // A row whose sequence starts here takes no state from the step before: its previous hidden
            // state is read as zeros.
            const float* h[MR];
            bool fresh[MR];
            for (int r = 0; r < rows; ++r) {
                fresh[r] = t == 0 || f.keep[first + r] == 0.0f;
                h[r] = fresh[r] ? zeros.data() : f.hs + (first + r - f.B) * U;
            }
            if (f.x) {
                const float* x[MR];
                for (int r = 0; r < rows; ++r) x[r] = f.x + (first + r) * f.I;
                product(rows, x, f.I, 4 * U, f.panels_x, out);
                if (t > 0) product<true>(rows, h, U, 4 * U, f.panels, out);
                for (int r = 0; r < rows; ++r)
                    for (int j = 0; j < f.I; j += W)
                        record<Stream>(f.h_prev + (first + r) * prev_width + j, load(x[r] + j));
            } else if (t > 0) {
                product(rows, h, U, 4 * U, f.panels, out);
            }
            for (int r = 0; r < rows; ++r) {
                const size_t row = first + r;
                const float* x = f.xproj ? f.xproj + row * 4 * U
                                         : f.ids ? f.table + static_cast<size_t>(f.ids[row]) * 4 * U : zeros.data();
                const float* zr = out[r];
                float* cs = &c_state[static_cast<size_t>(r0 + r) * U];
                float* d = f.derivs + row * 4 * U;
                float* e = f.cell + row * 2 * U;
                if (fresh[r] && t > 0) std::memset(cs, 0, sizeof(float) * U);
                const float* h_before = h[r];
                float* prev = f.h_prev + (row + 1) * prev_width - U;
                for (int j = 0; j < U; j += W) {
                    record<Stream>(prev + j, load(h_before + j));
                    if (f.xproj)
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
                    if (f.dropout.threshold) {
                        const vf factors = dropout_factors(f.dropout, static_cast<unsigned>(row * U + j));
                        store(f.out + row * U + j, o * tc * factors);
                    }
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
    int T, B, U, I;
    Dropout dropout;  // as given to the forward loop: dhs are the gradients of the output after it
    const float* keep;
    const float* dhs;
    const float* derivs;
    const float* cell;
    const float* panels;    // recurrent^T [4U, U]
    const float* panels_x;  // kernel^T [4U, I], or null: no input gradient
    float* dz;
    float* dx;  // [T, B, I]
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
                    vf dh_out = load(g.dhs + row * U + j);
                    if (g.dropout.threshold)
                        dh_out *= dropout_factors(g.dropout, static_cast<unsigned>(row * U + j));
                    const vf dh = dh_out + load(hn + j);
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
            if (g.panels_x) {  // the inputs' gradient, while the block's gate gradients are in cache
                float* dx[MR];
                for (int r = 0; r < rows; ++r) dx[r] = g.dx + (static_cast<size_t>(t) * g.B + b_first + r0 + r) * g.I;
                product(rows, a, 4 * U, g.I, g.panels_x, dx);
            }
            if (t == 0) continue;
            product(rows, a, 4 * U, U, g.panels, out);
            for (int r = 0; r < rows; ++r)  // a sequence that starts here passes nothing back to the step before
                if (g.keep[static_cast<size_t>(t) * g.B + b_first + r0 + r] == 0.0f) {
                    std::memset(out[r], 0, sizeof(float) * U);
                    std::memset(&dc_next[static_cast<size_t>(r0 + r) * U], 0, sizeof(float) * U);
                }
        }
}

// The sizes the loops take; anything else returns -1 from the entry points, which then write nothing.
// Positions are hashed as 32-bit numbers for dropout, so a layer's outputs must number fewer than 2^32.
bool valid(int T, int B, int U) {
    return T > 0 && B > 0 && U > 0 && U % NR == 0 && static_cast<double>(T) * B * U < 4294967296.0;
}

// dropout: null (none) or {threshold in [1, 65536], seed, seed}; 65536 keeps everything.
bool valid_dropout(const unsigned* d) { return !d || (d[0] >= 1 && d[0] <= 65536); }

Dropout dropout_of(const unsigned* d) {
    if (!d || d[0] >= 65536) return Dropout{0, 1.0f, 0, 0};
    return Dropout{d[0], 65536.0f / static_cast<float>(d[0]), d[1], d[2]};
}

}  // namespace

extern "C" {

// Rows of the bias gradient's partial sums that lstm_backward writes for B rows.
int lstm_bias_blocks(int B) { return (B + SPLIT - 1) / SPLIT; }

// Hidden states, each step's previous hidden states (zero where a sequence starts: the recurrent kernel's
// gradient needs them; with `kernel`, after each step's inputs: see Forward) and the backward pass's records
// of one layer; 0, or -1 for sizes it does not take.
// keep [T, B] is 0 where a row's sequence starts (a row may hold several sequences one after the other) and
// 1 where the state goes on from the step before; every row starts from zero state at step 0. The input
// projections (see Forward) are `inputs` as xproj where `ids` and `kernel` are null; with `ids`, `inputs`
// is the table; with `kernel` [I, 4U], `inputs` is x [T, B, I].
int lstm_forward(int T, int B, int U, int I, const float* inputs, const int* ids, const float* kernel,
                 const float* keep, const float* bias, const float* recurrent, float* hs, float* h_prev,
                 float* derivs, float* cell, const unsigned* dropout, float* out, int threads) {
    if (!valid(T, B, U) || (kernel && (I <= 0 || I % NR)) || !valid_dropout(dropout)) return -1;
    const std::vector<float> panels = pack(recurrent, U, 4 * U, false);
    const std::vector<float> panels_x = kernel ? pack(kernel, I, 4 * U, false) : std::vector<float>();
    const bool plain = !ids && !kernel;
    const Forward f{T, B, U, I, plain ? inputs : nullptr, ids, ids ? inputs : nullptr, kernel ? inputs : nullptr,
                    panels_x.data(), keep, bias, panels.data(), hs, h_prev, derivs, cell, dropout_of(dropout), out};
    if (aligned(derivs) && aligned(cell) && aligned(h_prev))
        in_threads(B, SPLIT, threads, [&f](int first, int last) { forward_rows<true>(f, first, last); });
    else
        in_threads(B, SPLIT, threads, [&f](int first, int last) { forward_rows<false>(f, first, last); });
    return 0;
}

// Gradients of the gate pre-activations dz [T, B, 4U] and partial sums of them [lstm_bias_blocks(B), 4U]
// (the bias gradient is their sum), given the gradients of the hidden states and the forward loop's
// records (and `keep`, as given to lstm_forward); with `kernel` [I, 4U] also the inputs' gradient dx
// [T, B, I] = dz @ kernel^T. Each partial sum covers fixed rows, so the result does not depend on the number of threads.
// 0, or -1 for sizes it does not take.
int lstm_backward(int T, int B, int U, int I, const float* keep, const float* dhs, const float* derivs,
                  const float* cell, const float* recurrent, const float* kernel, const unsigned* dropout, float* dz,
                  float* dx, float* dbias, int threads) {
    if (!valid(T, B, U) || (kernel && (I <= 0 || I % NR)) || !valid_dropout(dropout)) return -1;
    const std::vector<float> panels = pack(recurrent, 4 * U, U, true);
    const std::vector<float> panels_x = kernel ? pack(kernel, 4 * U, I, true) : std::vector<float>();
    const Backward g{T, B, U, I, dropout_of(dropout), keep, dhs, derivs, cell, panels.data(),
                     kernel ? panels_x.data() : nullptr, dz, dx, dbias};
    in_threads(B, SPLIT, threads, [&g](int first, int last) { backward_rows(g, first, last); });
    return 0;
}

}
