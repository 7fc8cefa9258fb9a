"""Generation engines behind one small protocol (`Engine`)."""

from duetlm.engines.base import Engine, Generation, SamplingParams

__all__ = ["Engine", "Generation", "SamplingParams"]
