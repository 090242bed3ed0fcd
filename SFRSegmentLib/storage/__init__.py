"""Files on disk: atomic writes, medical volumes (NRRD, NIfTI, .seg.nrrd), the run folder's layout, provenance records
and training checkpoints. Every file a stage writes goes through here, so nothing is ever half-written."""
