"""Target models: one decoder implementation for the Qwen3, Qwen2 and Llama families.

    from dspark.models import load_target
    target = load_target("/models/Qwen3-8B", dtype="bfloat16")
"""

from dspark.models.config import FAMILIES, Family, ModelConfig, RopeScaling, supported_architectures
from dspark.models.loader import CPU_GEMM_MODES, ForwardResult, TargetModel, load_config, load_target, resolve_dtype
from dspark.models.transformer import Transformer

__all__ = [
    "CPU_GEMM_MODES",
    "FAMILIES",
    "Family",
    "ForwardResult",
    "ModelConfig",
    "RopeScaling",
    "TargetModel",
    "Transformer",
    "load_config",
    "load_target",
    "resolve_dtype",
    "supported_architectures",
]
