"""SAM for SFR: the model classes, weights, LoRA adaptation, fine-tuning (stage F) and pseudo-labelling (stage P)."""
