"""Encoders: the frozen CLIP image encoder (:mod:`.clip`) and its identity, options and weight
checks (:mod:`.clip_spec`, importable without torch)."""
