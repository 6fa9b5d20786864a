// Fused CT preprocessing: stored pixels -> network input, one thread per output pixel.
//
// stored value -> padding mask -> HU -> window + clip (every window) -> bilinear
// resample -> normalize -> float32 or float16, written straight into an NCHW
// buffer (e.g. the TensorRT input binding) at any channel offset.
// The numerics mirror edge/preprocess/reference.py; the resampling convention
// is the one documented in edge/preprocess/spec.py.
//
// Self-contained on purpose: no #include, so it compiles unchanged with nvcc
// (pycuda, tests), with NVRTC (cupy.RawModule), and as host code for the
// CPU emulation test. Keep PreprocessParams in sync with PARAMS_DTYPE in
// edge/preprocess/cuda_kernel.py (tests compare the two layouts).

#define PREPROCESS_MAX_WINDOWS 4

struct PreprocessParams {
    // Output pixel (row, col) samples source coordinate
    // (row * scale_y + offset_y, col * scale_x + offset_x). Double so that
    // sample positions match the float64 reference far below 1e-5 pixel.
    double scale_y;
    double offset_y;
    double scale_x;
    double offset_x;
    int src_rows;
    int src_cols;
    int src_row_stride;      // elements
    int src_frame_stride;    // elements between frames (blockIdx.z)
    int dst_rows;
    int dst_cols;
    int dst_row_stride;      // elements
    int dst_channel_stride;  // elements between the planes of consecutive windows
    int dst_frame_stride;    // elements between the first planes of consecutive frames
    int n_windows;           // 1..PREPROCESS_MAX_WINDOWS
    int has_padding;         // nonzero: stored values in [padding_low, padding_high] are padding
    int padding_low;
    int padding_high;
    float rescale_slope;
    float rescale_intercept;
    float fill_hu;           // HU of padding and of samples outside the image
    float mean;
    float inv_std;
    float window_low[PREPROCESS_MAX_WINDOWS];        // HU mapped to 0
    float window_inv_width[PREPROCESS_MAX_WINDOWS];  // 1 / width in HU
};

// One axis of the sampling: neighbours, weight of the upper one, and whether
// the sample lies within half a pixel of the image (else it is fill).
struct AxisSample {
    int lower;
    int upper;
    float weight;
    bool inside;
};

__host__ __device__ inline AxisSample sample_axis(double coord, int n)
{
    AxisSample s;
    s.inside = coord >= -0.5 && coord <= n - 0.5;
    const double last = (double)(n - 1);
    const double clamped = coord < 0.0 ? 0.0 : (coord > last ? last : coord);
    s.lower = (int)clamped;  // truncation == floor, clamped >= 0
    s.upper = s.lower + 1 < n ? s.lower + 1 : n - 1;
    s.weight = (float)(clamped - (double)s.lower);
    return s;
}

template <typename SrcT>
__host__ __device__ inline float stored_to_hu(SrcT stored, const PreprocessParams& p)
{
    const int v = (int)stored;
    if (p.has_padding && v >= p.padding_low && v <= p.padding_high) {
        return p.fill_hu;
    }
    return (float)v * p.rescale_slope + p.rescale_intercept;
}

__host__ __device__ inline float window_unit(float hu, const PreprocessParams& p, int w)
{
    const float u = (hu - p.window_low[w]) * p.window_inv_width[w];
    return u < 0.0f ? 0.0f : (u > 1.0f ? 1.0f : u);  // no math library: NVRTC needs no headers
}

// IEEE binary16 bits of a float, round to nearest even (as cvt.rn.f16.f32).
__host__ __device__ inline unsigned short float_to_half_bits(float value)
{
#ifdef __CUDA_ARCH__
    unsigned short bits;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
    return bits;
#else
    // Host emulation only (tests).
    union {
        float f;
        unsigned int u;
    } in;
    in.f = value;
    const unsigned int sign = (in.u >> 16) & 0x8000u;
    const unsigned int mag = in.u & 0x7fffffffu;
    if (mag > 0x7f800000u) {
        return (unsigned short)(sign | 0x7e00u);  // NaN
    }
    if (mag >= 0x477ff000u) {
        return (unsigned short)(sign | 0x7c00u);  // rounds beyond 65504: inf
    }
    if (mag < 0x38800000u) {  // below the smallest normal half: subnormal or zero
        const unsigned int exponent = mag >> 23;
        if (exponent < 102u) {
            return (unsigned short)sign;  // below 2^-25: rounds to zero
        }
        const unsigned int mantissa = (mag & 0x7fffffu) | 0x800000u;
        const unsigned int shift = 126u - exponent;  // 14..24
        unsigned int q = mantissa >> shift;
        const unsigned int rem = mantissa & ((1u << shift) - 1u);
        const unsigned int half = 1u << (shift - 1u);
        if (rem > half || (rem == half && (q & 1u))) {
            ++q;
        }
        return (unsigned short)(sign | q);
    }
    unsigned int h = (mag - 0x38000000u) >> 13;  // rebias exponent 127 -> 15
    const unsigned int rem = mag & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) {
        ++h;  // a carry into the exponent is the correct rounding
    }
    return (unsigned short)(sign | h);
#endif
}

__host__ __device__ inline void store_value(float* dst, float value) { *dst = value; }

// float16 output is passed as its bit pattern (unsigned short) so that no
// cuda_fp16.h is needed.
__host__ __device__ inline void store_value(unsigned short* dst, float value) { *dst = float_to_half_bits(value); }

// The whole pipeline for one output pixel of one frame. Host-callable so that
// tests can run the exact kernel arithmetic without a GPU.
template <typename SrcT, typename DstT>
__host__ __device__ inline void preprocess_pixel(const SrcT* __restrict__ src, DstT* __restrict__ dst,
                                                 const PreprocessParams& p, int row, int col, int frame)
{
    const AxisSample sy = sample_axis(row * p.scale_y + p.offset_y, p.src_rows);
    const AxisSample sx = sample_axis(col * p.scale_x + p.offset_x, p.src_cols);
    const bool inside = sy.inside && sx.inside;

    float hu00 = p.fill_hu, hu01 = p.fill_hu, hu10 = p.fill_hu, hu11 = p.fill_hu;
    if (inside) {
        const SrcT* frame_src = src + (long long)frame * p.src_frame_stride;
        const SrcT* row0 = frame_src + (long long)sy.lower * p.src_row_stride;
        const SrcT* row1 = frame_src + (long long)sy.upper * p.src_row_stride;
        hu00 = stored_to_hu(row0[sx.lower], p);
        hu01 = stored_to_hu(row0[sx.upper], p);
        hu10 = stored_to_hu(row1[sx.lower], p);
        hu11 = stored_to_hu(row1[sx.upper], p);
    }

    DstT* out = dst + (long long)frame * p.dst_frame_stride + (long long)row * p.dst_row_stride + col;
#ifdef __CUDA_ARCH__
#pragma unroll
#endif
    for (int w = 0; w < PREPROCESS_MAX_WINDOWS; ++w) {
        if (w < p.n_windows) {
            float value;
            if (inside) {
                const float u00 = window_unit(hu00, p, w);
                const float u01 = window_unit(hu01, p, w);
                const float u10 = window_unit(hu10, p, w);
                const float u11 = window_unit(hu11, p, w);
                const float top = u00 + (u01 - u00) * sx.weight;
                const float bottom = u10 + (u11 - u10) * sx.weight;
                value = top + (bottom - top) * sy.weight;
            } else {
                value = window_unit(p.fill_hu, p, w);
            }
            store_value(out + (long long)w * p.dst_channel_stride, (value - p.mean) * p.inv_std);
        }
    }
}

// Grid: x over output columns, y over output rows, z over frames.
template <typename SrcT, typename DstT>
__device__ inline void preprocess_grid(const SrcT* __restrict__ src, DstT* __restrict__ dst, const PreprocessParams& p)
{
    const int col = (int)(blockIdx.x * blockDim.x + threadIdx.x);
    const int row = (int)(blockIdx.y * blockDim.y + threadIdx.y);
    if (row < p.dst_rows && col < p.dst_cols) {
        preprocess_pixel(src, dst, p, row, col, (int)blockIdx.z);
    }
}

extern "C" __global__ void preprocess_int16_float32(const short* __restrict__ src, float* __restrict__ dst,
                                                    const PreprocessParams params)
{
    preprocess_grid(src, dst, params);
}

extern "C" __global__ void preprocess_int16_float16(const short* __restrict__ src, unsigned short* __restrict__ dst,
                                                    const PreprocessParams params)
{
    preprocess_grid(src, dst, params);
}

extern "C" __global__ void preprocess_uint16_float32(const unsigned short* __restrict__ src,
                                                     float* __restrict__ dst, const PreprocessParams params)
{
    preprocess_grid(src, dst, params);
}

extern "C" __global__ void preprocess_uint16_float16(const unsigned short* __restrict__ src,
                                                     unsigned short* __restrict__ dst, const PreprocessParams params)
{
    preprocess_grid(src, dst, params);
}
