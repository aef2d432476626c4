"""Score passes: one importance per channel group (or per weight) for the mask passes to read.

- `magnitude`: weight magnitude (L1, L2), random.
- `criteria`: weight-only criteria beyond magnitude (FPGM, BN scale).
- `data`: calibration-data scores (Taylor, activation, APoZ, Wanda, head sensitivity).
"""
