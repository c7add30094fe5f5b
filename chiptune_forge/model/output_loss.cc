// The network's output layer and its masked softmax cross-entropy for training: logits, loss, accuracy and
// the gradients of the hidden states, the kernel and the bias, in one pass over blocks of rows.
//
// Done as separate TensorFlow operations, the [rows, classes] logits and their gradient go to memory and
// back four times, and positions outside the mask (padding) cost as much as real ones. Here a block of up
// to BLOCK real rows is multiplied out into a buffer that stays in cache, turned into its gradient there,
// and multiplied back for the hidden states' and the kernel's gradients before the next block; masked rows
// only get a zero gradient. Rows are taken in fixed groups of GROUP, each with its own partial sums of the
// kernel and bias gradients, loss and hits, added up in group order at the end: results are the same on
// any number of cores.
//
// Layouts (row-major, float32): hidden [rows, H], kernel [H, C], bias [C], labels (int32) and mask [rows];
// d_hidden [rows, H], d_kernel [H, C], d_bias [C]. H must be a multiple of 16; C is padded to one inside.
//
// Built by chiptune_forge/model/native.py together with lstm_loops.cc.

#include <cmath>
#include <cstring>

#include "kernels.h"

namespace {

constexpr int BLOCK = 64;   // real rows per block: a block's logits (BLOCK x padded C floats) stay in cache
constexpr int GROUP = 512;  // rows per group of partial sums

struct Head {
    int rows, H, C, CP;  // CP: C padded to a multiple of NR
    const float* hidden;
    const int* labels;
    const float* mask;
    const float* bias;       // [CP], zero past C
    const float* panels;     // kernel [H, CP], zero past C
    const float* panels_t;   // kernel^T [CP, H], zero past C
    float scale;             // 1 / the sum of the mask: the loss is a mean over real positions
    float* d_hidden;
    float* kernel_sums;      // [groups, H, CP]
    float* bias_sums;        // [groups, CP]
    double* loss_sums;       // [groups]
    double* hit_sums;        // [groups]
};

// Index of the first lane where `mask` (a comparison's all-ones or zero lanes) is set, or -1.
inline int first_lane(vi mask) {
#if defined(__AVX__)
    const int bits = _mm256_movemask_ps(reinterpret_cast<__m256>(mask));
    return bits ? __builtin_ctz(bits) : -1;
#else
    for (int k = 0; k < W; ++k)
        if (mask[k]) return k;
    return -1;
#endif
}

// Turns one row of logits (without bias) into the gradient of the mean loss with respect to them, in place,
// and returns the row's cross-entropy; `hit` says whether its first largest logit is the label's.
float softmax_row(float* l, const float* bias, int C, int CP, int label, float weight, float scale, bool& hit) {
    const int whole = C / W * W;
    vf tops = splat(-INFINITY);
    for (int j = 0; j < whole; j += W) {
        const vf v = load(l + j) + load(bias + j);
        store(l + j, v);
        tops = select(v > tops, v, tops);
    }
    float top = -INFINITY;
    for (int k = 0; k < W; ++k) top = tops[k] > top ? tops[k] : top;
    for (int j = whole; j < C; ++j) {
        l[j] += bias[j];
        top = l[j] > top ? l[j] : top;
    }
    int first = -1;
    for (int j = 0; j < whole && first < 0; j += W) {
        const int lane = first_lane(load(l + j) == splat(top));
        first = lane < 0 ? -1 : j + lane;
    }
    for (int j = whole; j < C && first < 0; ++j) first = l[j] == top ? j : -1;
    hit = first == label;
    const float picked = l[label] - top;
    vf sums = splat(0.0f);
    for (int j = 0; j < whole; j += W) {
        const vf e = exp_v(clamp(load(l + j) - splat(top), -87.0f, 0.0f));
        store(l + j, e);
        sums += e;
    }
    float total = 0.0f;
    for (int k = 0; k < W; ++k) total += sums[k];
    for (int j = whole; j < C; ++j) {
        l[j] = std::exp(l[j] - top);
        total += l[j];
    }
    const float g = weight * scale;
    const vf per = splat(g / total);
    for (int j = 0; j < whole; j += W) store(l + j, load(l + j) * per);
    for (int j = whole; j < C; ++j) l[j] *= g / total;
    l[label] -= g;
    for (int j = C; j < CP; ++j) l[j] = 0.0f;
    return weight * (std::log(total) - picked);
}

// sums[r][j0 .. j0+NR) (+)= sum over k of rows[k][i0 + r] * d[k][j0 .. j0+NR), for R <= MR: a block of
// hidden^T @ d_logits read from the rows in place, without transposing them first.
template <int R, bool Add>
void block_t(const float* const* rows, int i0, int K, const float* const* d, int j0, float* sums, int CP) {
    vf acc[R][2] = {};
    for (int k = 0; k < K; ++k) {
        vf w0 = load(d[k] + j0), w1 = load(d[k] + j0 + W);
        in_register(w0, w1);
        const float* a = rows[k] + i0;
        for (int r = 0; r < R; ++r) {
            const vf x = splat(a[r]);
            acc[r][0] += x * w0;
            acc[r][1] += x * w1;
        }
    }
    for (int r = 0; r < R; ++r) {
        float* o = sums + static_cast<size_t>(i0 + r) * CP + j0;
        store(o, Add ? load(o) + acc[r][0] : acc[r][0]);
        store(o + W, Add ? load(o + W) + acc[r][1] : acc[r][1]);
    }
}

// sums [H, CP] (+)= rows^T @ d for K rows of H and of CP floats.
template <bool Add>
void kernel_gradient(const float* const* rows, int H, int K, const float* const* d, int CP, float* sums) {
    const int blocks = (H + MR - 1) / MR;
    for (int j0 = 0; j0 < CP; j0 += NR)
        for (int k = 0; k < blocks; ++k) {
            const int i0 = H * k / blocks, n = H * (k + 1) / blocks - i0;
            switch (n) {
                case 6: block_t<6, Add>(rows, i0, K, d, j0, sums, CP); break;
                case 5: block_t<5, Add>(rows, i0, K, d, j0, sums, CP); break;
                case 4: block_t<4, Add>(rows, i0, K, d, j0, sums, CP); break;
                case 3: block_t<3, Add>(rows, i0, K, d, j0, sums, CP); break;
                case 2: block_t<2, Add>(rows, i0, K, d, j0, sums, CP); break;
                default: block_t<1, Add>(rows, i0, K, d, j0, sums, CP); break;
            }
        }
}

// One block of n real rows (their indices in `idx`) of a group: logits, their gradient, and its products.
// The group's first block sets its partial sums, later ones add to them.
void head_block(const Head& h, const int* idx, int n, int group, bool first, float* logits) {
    const float* a[BLOCK];
    float* out[BLOCK];
    for (int r = 0; r < n; ++r) {
        a[r] = h.hidden + static_cast<size_t>(idx[r]) * h.H;
        out[r] = logits + static_cast<size_t>(r) * h.CP;
    }
    product(n, a, h.H, h.CP, h.panels, out);
    float* bias_sum = h.bias_sums + static_cast<size_t>(group) * h.CP;
    if (first) std::memset(bias_sum, 0, sizeof(float) * h.CP);
    double loss = 0.0, hits = 0.0;
    for (int r = 0; r < n; ++r) {
        bool hit = false;
        loss += softmax_row(out[r], h.bias, h.C, h.CP, h.labels[idx[r]], h.mask[idx[r]], h.scale, hit);
        hits += hit ? h.mask[idx[r]] : 0.0f;
        for (int j = 0; j < h.CP; j += W) store(bias_sum + j, load(bias_sum + j) + load(out[r] + j));
    }
    h.loss_sums[group] += loss;
    h.hit_sums[group] += hits;

    float* d_rows[BLOCK];
    for (int r = 0; r < n; ++r) d_rows[r] = h.d_hidden + static_cast<size_t>(idx[r]) * h.H;
    product(n, out, h.CP, h.H, h.panels_t, d_rows);  // d_hidden = d_logits @ kernel^T
    float* kernel_sum = h.kernel_sums + static_cast<size_t>(group) * h.H * h.CP;
    if (first)
        kernel_gradient<false>(a, h.H, n, out, h.CP, kernel_sum);
    else
        kernel_gradient<true>(a, h.H, n, out, h.CP, kernel_sum);
}

// Groups first, first + step, ... of rows: taken in turn, so that every thread gets its share of the
// padding (time-major batches keep it in the last steps).
void head_groups(const Head& h, int first, int step) {
    std::vector<float> logits(static_cast<size_t>(BLOCK) * h.CP);
    const int groups = (h.rows + GROUP - 1) / GROUP;
    int idx[BLOCK];
    for (int g = first; g < groups; g += step) {
        h.loss_sums[g] = h.hit_sums[g] = 0.0;
        const int last = (g + 1) * GROUP < h.rows ? (g + 1) * GROUP : h.rows;
        int n = 0;
        bool first_block = true;
        for (int row = g * GROUP; row < last; ++row) {
            if (h.mask[row] == 0.0f) {
                std::memset(h.d_hidden + static_cast<size_t>(row) * h.H, 0, sizeof(float) * h.H);
                continue;
            }
            idx[n++] = row;
            if (n == BLOCK) {
                head_block(h, idx, n, g, first_block, logits.data());
                n = 0;
                first_block = false;
            }
        }
        if (n) {
            head_block(h, idx, n, g, first_block, logits.data());
        } else if (first_block) {  // no real rows
            std::memset(h.kernel_sums + static_cast<size_t>(g) * h.H * h.CP, 0, sizeof(float) * h.H * h.CP);
            std::memset(h.bias_sums + static_cast<size_t>(g) * h.CP, 0, sizeof(float) * h.CP);
        }
    }
}

}  // namespace

extern "C" {

// Groups of partial sums that output_loss uses for `rows` rows (its workspace holds that many times
// H * CP + CP floats).
int output_loss_groups(int rows) { return (rows + GROUP - 1) / GROUP; }

// Writes the sums of the masked cross-entropy and of the masked hits (`sums`: 2 doubles), and the
// gradients of the mean loss (the cross-entropy sum / mask_total); 0, or -1 for sizes it does not take or
// a label outside [0, C). `workspace` holds output_loss_groups(rows) * (H * CP + CP) floats, CP being C
// rounded up to a multiple of 16.
int output_loss(int rows, int H, int C, const float* hidden, const float* kernel, const float* bias,
                const int* labels, const float* mask, double mask_total, double* sums, float* d_hidden,
                float* d_kernel, float* d_bias, float* workspace, int threads) {
    if (rows <= 0 || H <= 0 || H % NR || C <= 0) return -1;
    for (int row = 0; row < rows; ++row)
        if (mask[row] != 0.0f && (labels[row] < 0 || labels[row] >= C)) return -1;
    const int CP = (C + NR - 1) / NR * NR, groups = output_loss_groups(rows);
    std::vector<float> padded(static_cast<size_t>(H) * CP, 0.0f), padded_bias(CP, 0.0f);
    for (int i = 0; i < H; ++i) std::memcpy(&padded[static_cast<size_t>(i) * CP], kernel + static_cast<size_t>(i) * C,
                                            sizeof(float) * C);
    std::memcpy(padded_bias.data(), bias, sizeof(float) * C);
    const std::vector<float> panels = pack(padded.data(), H, CP, false), panels_t = pack(padded.data(), CP, H, true);
    std::vector<double> loss_sums(groups), hit_sums(groups);
    float* kernel_sums = workspace;
    float* bias_sums = workspace + static_cast<size_t>(groups) * H * CP;
    const Head h{rows, H, C, CP, hidden, labels, mask, padded_bias.data(), panels.data(), panels_t.data(),
                 static_cast<float>(1.0 / mask_total), d_hidden, kernel_sums, bias_sums, loss_sums.data(),
                 hit_sums.data()};
    threads = threads < 1 ? 1 : (threads > groups ? groups : threads);
    std::vector<std::thread> pool;
    for (int k = 1; k < threads; ++k) pool.emplace_back(head_groups, std::cref(h), k, threads);
    head_groups(h, 0, threads);
    for (auto& th : pool) th.join();

    sums[0] = sums[1] = 0.0;
    for (int g = 0; g < groups; ++g) {
        sums[0] += loss_sums[g];
        sums[1] += hit_sums[g];
    }
    // The groups' partial sums, added in group order.
    for (int i = 0; i < H; ++i) std::memcpy(d_kernel + static_cast<size_t>(i) * C, kernel_sums + static_cast<size_t>(i) * CP,
                                            sizeof(float) * C);
    std::memcpy(d_bias, bias_sums, sizeof(float) * C);
    for (int g = 1; g < groups; ++g) {
        for (int i = 0; i < H; ++i) {
            const float* part = kernel_sums + (static_cast<size_t>(g) * H + i) * CP;
            float* total = d_kernel + static_cast<size_t>(i) * C;
            for (int j = 0; j < C; ++j) total[j] += part[j];
        }
        for (int j = 0; j < C; ++j) d_bias[j] += bias_sums[static_cast<size_t>(g) * CP + j];
    }
    return 0;
}

}
