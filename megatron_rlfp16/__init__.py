"""megatron-rlfp16: RL fine-tuning on Megatron-Core with a colocated vLLM rollout, honest in FP16.

The package follows the data path (see docs/architecture.md):

- ``runtime``   torch.distributed + Megatron parallel state, on GPU (nccl) or CPU (gloo + emulation)
- ``models``    Hugging Face config -> Megatron ``TransformerConfig`` / ``GPTModel``
- ``bridge``    HF <-> Megatron weights: sharded import and a streaming, bucketed export generator
- ``checkpoint``  Megatron distributed checkpoints and HF safetensors directories on disk

Importing the package imports neither Megatron nor vLLM; each stage imports what it needs.
"""

__version__ = "0.1.0"
