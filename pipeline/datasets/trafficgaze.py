"""**TrafficGaze**: ``trafficframe/VV/FFFFFF.jpg`` camera frames, ``fixdata/fixdata{V}.mat``
fixations (one cell per frame), split entries ``"VV/FFFFFF.jpg"``."""

from __future__ import annotations

import re

from pipeline.datasets.readers import FixdataReader
from pipeline.datasets.spec import FRAME_SIZE, Dataset

ENTRY = re.compile(r"(\d{2})/(\d{6})\.jpg")
"""A split entry: groups video, frame (shared with DrFixD-rainy, which has the same layout)."""

DATASET = Dataset(
    "trafficgaze", "TrafficGaze", "TrafficGaze", ("trafficframe", "fixdata"), "trafficframe",
    ENTRY, "VV/FFFFFF.jpg", FRAME_SIZE, FRAME_SIZE, "fixations", FixdataReader,
    source="https://github.com/taodeng/CDNN-traffic-saliency",
    terms="the original release's terms (https://github.com/taodeng/CDNN-traffic-saliency);"
          " the SalM2 authors' copy: https://huggingface.co/datasets/springyu/TrafficGaze",
    citation="Deng et al., How Do Drivers Allocate Their Potential Attention? Driving Fixation"
             " Prediction via Convolutional Neural Networks, IEEE T-ITS 2020",
    mirror="springyu/TrafficGaze")
