// The project's kernels (kernels/cuda/*.cu) compiled for the CPU emulator, and the list of their
// entry points. kernels/src/emu.rs compiles this file once per source, with MRT_EMU_UNIT set to
// the source's index, so that each source is its own translation unit as it is its own NVRTC
// program; each is included inside a namespace of its own, so helpers of the same name in two
// sources cannot collide (the extern "C" entry points keep their plain names).
//
// Adding a kernel: list its entry point below, under its source (every `.entry` NVRTC emits must
// be listed; kernels/tests/emu.rs checks the list against the PTX). A new source in
// kernels/src/cuda.rs's SOURCES needs a unit here with the next index (units follow the order of
// SOURCES; emu.rs compiles one per source).

#include "../cuda/prelude.cuh"

#if MRT_EMU_UNIT == 0

namespace mrt_src_temporal_attention {
#include "../cuda/temporal_attention.cu"
}
#define K(NAME) MRT_EMU_REGISTER(mrt_src_temporal_attention, NAME)
K(temporal_attention_f32)
K(temporal_attention_f16)

#elif MRT_EMU_UNIT == 1

namespace mrt_src_sparse_causal_attention {
#include "../cuda/sparse_causal_attention.cu"
}
#define K(NAME) MRT_EMU_REGISTER(mrt_src_sparse_causal_attention, NAME)
K(sparse_causal_attention_f32)
K(sparse_causal_attention_f16)

#elif MRT_EMU_UNIT == 2

namespace mrt_src_engine_ops {
#include "../cuda/engine_ops.cu"
}
#define K(NAME) MRT_EMU_REGISTER(mrt_src_engine_ops, NAME)
#define K2(NAME) K(NAME##_f32) K(NAME##_f16)
K2(copy_strided)
K(copy_strided_b16)
K(copy_strided_i64)
K2(copy_transpose)
K2(binary)
K2(binary_same)
K2(unary)
K2(bias_residual)
K2(channel_bias)
K2(group_norm)
K2(group_norm_stats)
K2(group_norm_apply)
K2(group_norm_nhwc_stats)
K(group_norm_nhwc_finalize)
K2(group_norm_nhwc_coeffs)
K2(layer_norm_stats)
K2(group_norm_nhwc_apply)
K2(layer_norm)
K2(layer_norm_warp)
K2(softmax)
K2(geglu)
K2(gather_rows)
K2(cast_from_f32)
K2(cast_to_f32)
K2(fill)
#define KA(DP) K(attention_tiled_f16_d##DP) K(attention_short1_f16_d##DP) K(attention_short2_f16_d##DP)
KA(16)
KA(32)
KA(48)
KA(64)
KA(80)
KA(96)
KA(128)
KA(160)
KA(40)
K(attention_tiled2_f16_d40)
K(conv_igemm_f16_n64)
K(conv_igemm_f16_n128)
K(conv_igemm_gn_f16_n64)
K(conv_igemm_gn_f16_n128)
K(conv_igemm_ln_f16_n64)
K(conv_igemm_ln_f16_n128)
K(gemm_geglu_f16_n64)
K(gemm_geglu_f16_n128)

#else
#error "MRT_EMU_UNIT must name one of the sources above"
#endif
