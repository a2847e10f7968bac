"""The compatibility boundary: every use of a private or version-specific internal of vLLM
(:mod:`~megatron_rlfp16.compat.vllm`) or Megatron-Core (:mod:`~megatron_rlfp16.compat.megatron`,
with the CPU stand-ins for the CUDA calls Megatron makes) lives here, one module per library, each
function naming the versions it was checked against. Nothing else in the package touches them.
"""
