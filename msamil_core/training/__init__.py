"""Training: one engine (:mod:`.engine`) that MIL training (:mod:`.mil`), end-to-end training
(:mod:`.e2e`) and lesion segmentation plug into; folds (:mod:`.splits`).
The metrics it scores with are in :mod:`msamil_core.evaluation`."""
