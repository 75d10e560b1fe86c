"""Callbacks shared by every run."""

from lightmods.callbacks.meters import ThroughputMeter

__all__ = ["ThroughputMeter"]
