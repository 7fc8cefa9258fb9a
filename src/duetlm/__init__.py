"""duetlm: DUET (Dual-model Efficient Two-stage inference).

A capable model M reads a problem x and writes a short reasoning signal z; a lightweight model m reads
(x, z) and writes the final answer. Both are trained with GRPO on a reward that pays M for the marginal
utility of z to m and charges it lambda * |z| / B, with lambda adapted by dual ascent.
"""

__version__ = "0.1.0"
