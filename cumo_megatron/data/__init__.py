"""Training data for CuMo: LLaVA JSON records to padded, length-grouped, resumable micro-batches.

One concern per module:

* ``records``   LLaVA JSON / JSON-lines files, weighted mixtures of them, structural record checks
  (every problem names file, record index and id).
* ``images``    CLIP preprocessing (resize + center crop, or pad-to-square with the mean colour).
* ``templates`` / ``tokenizer``  prompt rendering and tokenisation (shifted labels + loss mask).
* ``dataset``   a map-style dataset of tokenised samples; bad samples become `Skipped` markers that
  a `DataHealth` counter records (policy ``skip``) or raise (policy ``fail``).
* ``batching``  collate: per-micro-batch padding (or a fixed length for pipeline parallelism).
* ``sampler``   deterministic, modality/length-grouped, data-parallel batch sampler with exact
  resume, and `ResumableLoader`, the iterator a training loop checkpoints.
* ``validate``  the checks behind ``tools/validate_data.py``.
"""
