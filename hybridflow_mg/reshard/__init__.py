"""The resharder: training-layout weights into the generation engine's parameters (DESIGN.md §2).

`kernels` holds the mechanics of the last step: applying a bucket's static copy map in one launch.
"""
