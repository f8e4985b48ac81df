"""msamil: multi-scale multiple-instance learning for whole-slide images.

The package holds everything the Snakemake workflow computes: slide access
(:mod:`msamil_core.slide`), thumbnails and masks, patch grids, the synthetic
demo cohort, patch encoders, the MIL model zoo (:mod:`msamil_core.mil`), the
training loops and the command line (:mod:`msamil_core.cli`).
"""

__version__ = "0.1.0"
