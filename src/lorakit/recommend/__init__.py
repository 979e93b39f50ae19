"""Advice from evidence: `recommend_config` turns lorakit's quality study and memory plan into starting settings."""

from .choices import Setting
from .recommender import Recommendation, recommend_config
from .study import Study

__all__ = ["recommend_config", "Recommendation", "Setting", "Study"]
