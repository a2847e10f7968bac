"""Old home of the CPU stand-ins, now in :mod:`megatron_rlfp16.compat.megatron`."""
from megatron_rlfp16.compat.megatron import cpu_stand_ins_installed as installed  # noqa: F401
from megatron_rlfp16.compat.megatron import install_cpu_stand_ins as install  # noqa: F401
