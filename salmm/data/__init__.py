"""Data: the trainer's stages over a prepared dataset (:mod:`.stages`), and the inference
sources — videos, cameras, image folders, MJPEG pipes (:mod:`.sources`)."""
