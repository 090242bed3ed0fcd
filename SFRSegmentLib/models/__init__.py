"""The networks: the V-Net that SFR re-trains (:mod:`.vnet`) and the SAM family with LoRA and stitching
(:mod:`.sam`: SAM ViT-B/L/H, MedSAM, LiteMedSAM, the model catalog and the weights)."""
