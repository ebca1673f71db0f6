"""Pictures: heat-map overlays, panels and videos (:mod:`.overlay`) and training curves
(:mod:`.plots`)."""
