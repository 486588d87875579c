"""longside.kernels: the 4-bit NF4 matmul core.

NF4 weights in bitsandbytes' exact layout (`NF4Weight`, `quantize_nf4`), a plain-torch
reference (`dequantize_nf4`, `matmul_nf4_reference`), one dispatching entry point
(`matmul_nf4`: C kernel on CPU, Triton on CUDA), an nn.Linear replacement (`QuantLinear`)
and whole-model helpers (`quantize_model`, `save_quantized`, `load_quantized`).
"""

from longside.kernels.nf4 import NF4_CODE, NF4Weight, dequantize_nf4, matmul_nf4_reference, quantize_nf4
from longside.kernels.ops import dequantize, matmul_nf4
from longside.kernels.quant_linear import QuantLinear, load_quantized, quantize_model, save_quantized

__all__ = [
    "NF4_CODE", "NF4Weight", "quantize_nf4", "dequantize_nf4", "matmul_nf4_reference",
    "matmul_nf4", "dequantize", "QuantLinear", "quantize_model", "save_quantized", "load_quantized",
]
