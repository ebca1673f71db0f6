"""How predictions are drawn, by name: the colour maps, the heat map's opacity, the animation
formats (importing this module imports nothing heavy; :mod:`.overlay` draws them)."""

COLORMAP_NAMES = ("jet", "inferno", "turbo", "viridis")
DEFAULT_COLORMAP = "jet"
DEFAULT_ALPHA = 0.6
"""Heat-map opacity at the most salient pixel."""
ANIMATION_FORMATS = ("auto", "gif", "mp4", "none")
