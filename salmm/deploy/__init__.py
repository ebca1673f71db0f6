"""Deployment: heat-map pictures of predictions (:mod:`.pictures`), ONNX graphs of a checkpoint
(:mod:`.graphs`), live streaming on torch or onnxruntime (:mod:`.live`), and their options
(:mod:`.options`, importable without torch)."""
