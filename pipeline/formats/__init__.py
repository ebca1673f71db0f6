"""Formats: what the bytes of a prepared dataset and its CLIP cache mean.

Image decoding (:mod:`.images`), labels from fixations and gaze maps (:mod:`.labels`), the
manifest and version id (:mod:`.manifest`), the sample codec and shards (:mod:`.shards`), the
shard index for random access (:mod:`.shard_index`), the CLIP cache (:mod:`.clip_cache`), and the
prepared dataset that owns them (:mod:`.prepared`).
"""
