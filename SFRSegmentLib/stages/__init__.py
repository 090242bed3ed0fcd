"""SFR's stages, each a module of one job: fine-tune SAM (F, :mod:`.finetune`), pseudo-label the unlabeled volumes
(P, :mod:`.pseudolabel`), re-train the V-Net with a semi-supervised method and the pseudo-labels (R, :mod:`.retrain`
with :mod:`.semisupervised` and :mod:`.losses`), SFR+'s confidence-based selection (:mod:`.sfrplus`,
:mod:`.confidence`) and prediction with the trained V-Net (:mod:`.inference`). F and R share one training loop
(:mod:`.training`)."""
