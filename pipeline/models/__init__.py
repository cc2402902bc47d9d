"""Model adapters (one file per MoE family), the registry, and model loading."""

from pipeline.models.base import MoEAdapter
from pipeline.models.registry import get_adapter, supported_model_types

__all__ = ["MoEAdapter", "get_adapter", "supported_model_types"]
