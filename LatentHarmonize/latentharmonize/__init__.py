"""LatentHarmonize backend: scanner-invariant lung tissue clusters from chest CT.

This package never imports ``slicer``; the 3D Slicer module runs it in a background process.
"""
__version__ = "0.1.0"
