"""msamil: multi-scale multiple-instance learning for whole-slide images.

The package holds everything the Snakemake workflow computes, one subpackage per stage: slides
(:mod:`.wsi`), features (:mod:`.features`), the MIL model zoo (:mod:`.mil`), training
(:mod:`.training`), metrics and statistics (:mod:`.evaluation`), lesion segmentation
(:mod:`.segmentation`), reporting (:mod:`.reporting`), the cohort (:mod:`.cohort`) and the
command line (:mod:`.cli`); :mod:`.pipeline` is the per-slide chain and :mod:`.prediction` the
fold ensembles. The README's layout section says what each part owns.
"""

__version__ = "0.1.0"
