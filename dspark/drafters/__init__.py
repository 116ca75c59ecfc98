"""Drafters: one module per method, a `Drafter` protocol the engine calls, and a registry.

    from dspark.drafters import load_drafter
    drafter = load_drafter("runs/dspark-drafter", target, max_seqs=8, max_len=4096)
    proposal = drafter.propose(slots, anchors, ells, sampling, generators)   # DraftProposal
"""

import importlib

from dspark.drafters.base import (ARCHITECTURES, DRAFTERS, DraftCommit, DraftProposal, Drafter, DraftStop,
                                  drafter_type_of, load_drafter, register_drafter)
from dspark.drafters.dspark_drafter import (DFlashDrafter, DraftTrainOutput, DSparkConfig, DSparkDrafter,
                                            DSparkModel, default_target_layer_ids)

# Other drafters shipped with DSpark register themselves on import; modules not present in this
# checkout are skipped, so the registry holds whatever is installed.
for _name in ("ngram", "eagle3", "draft_model"):
    try:
        importlib.import_module(f"dspark.drafters.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"dspark.drafters.{_name}":
            raise

__all__ = [
    "ARCHITECTURES",
    "DRAFTERS",
    "DFlashDrafter",
    "DSparkConfig",
    "DSparkDrafter",
    "DSparkModel",
    "DraftCommit",
    "DraftProposal",
    "DraftStop",
    "DraftTrainOutput",
    "Drafter",
    "default_target_layer_ids",
    "drafter_type_of",
    "load_drafter",
    "register_drafter",
]
