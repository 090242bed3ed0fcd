"""The SAM family for SFR: SAM ViT-B/L/H, MedSAM and LiteMedSAM (TinyViT) without prompts and with K+1 masks,
LoRA adaptation, the stitching of 3D patches into 2D mosaics, the model catalog and its weights."""
