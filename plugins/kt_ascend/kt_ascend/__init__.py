"""ktcore backend for Huawei Ascend NPUs, through ``torch_npu`` (device type ``npu``).

Ops (entry point ``ascend`` -> ``kt_ascend.plugin``):

- ``KLinearAscend`` (linear): ``torch_npu.npu_weight_quant_batchmatmul`` over GGUF weights repacked
  without requantizing: Q4_0/Q4_1/Q4_K as int4 (packed by ``npu_convert_weight_to_int4pack``),
  Q5_0/Q5_1/Q5_K/Q8_0 as int8, each with a per-32 antiquant scale and offset; other types dequantized.
- ``KExpertsAscend`` (experts): routed MoE experts over the same weight-quantized matmul, one call per
  expert that received tokens.
- ``KAttentionAscend`` (attention): ``npu_fusion_attention`` for prefill, ``npu_incre_flash_attention`` for
  decode, ``npu_rotary_mul`` for the rotary embedding (head size 128).

Nothing here imports ``torch_npu`` at import time; ``available()`` says why an op cannot run.
"""

__version__ = "0.1.0"
