"""Lesion segmentation with UNet++ on slide thumbnails (MsaMIL-Net section 3.1): the model and its
checkpoints (:mod:`.model`), training (:mod:`.training`) and the torch-free step from
probabilities to the lesion mask (:mod:`.postprocess`)."""
