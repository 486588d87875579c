"""longside.kernels: the 4-bit matmul cores.

GGUF blocks as the file stores them (`GGMLWeight`; Q4_0, Q4_1, Q5_0, Q8_0, Q4_K, Q6_K), run by
C kernels on CPU and Triton on CUDA (`matmul_ggml`), in `GGUFLinear`/`GGUFEmbedding`
layers that `load_gguf_layers` puts into a model: the default for GGUF backbones.

NF4 weights in bitsandbytes' exact layout (`NF4Weight`, `quantize_nf4`), a plain-torch
reference (`dequantize_nf4`, `matmul_nf4_reference`), one dispatching entry point
(`matmul_nf4`: C kernel on CPU, Triton on CUDA), an nn.Linear replacement (`QuantLinear`)
and whole-model helpers (`quantize_model`, `save_quantized`, `load_quantized`): for
Hugging Face checkpoints in bf16/fp16.
"""

from longside.kernels.ggml import GGML_TYPES, GGMLWeight, dequantize_reference
from longside.kernels.gguf_linear import GGUFEmbedding, GGUFLinear, load_gguf_layers, matmul_ggml, set_activations
from longside.kernels.nf4 import NF4_CODE, NF4Weight, dequantize_nf4, matmul_nf4_reference, quantize_nf4
from longside.kernels.ops import dequantize, matmul_nf4
from longside.kernels.quant_linear import QuantLinear, load_quantized, quantize_model, save_quantized

__all__ = [
    "GGML_TYPES", "GGMLWeight", "dequantize_reference", "GGUFLinear", "GGUFEmbedding", "load_gguf_layers",
    "matmul_ggml", "set_activations",
    "NF4_CODE", "NF4Weight", "quantize_nf4", "dequantize_nf4", "matmul_nf4_reference",
    "matmul_nf4", "dequantize", "QuantLinear", "quantize_model", "save_quantized", "load_quantized",
]
