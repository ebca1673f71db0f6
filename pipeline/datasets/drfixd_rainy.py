"""**DrFixD-rainy**: the TrafficGaze layout (``trafficframe/``, ``fixdata/``, split entries
``"VV/FFFFFF.jpg"``), rainy scenes; its release unpacks to ``DrFixD_rainy``."""

from __future__ import annotations

from pipeline.datasets.readers import FixdataReader
from pipeline.datasets.spec import FRAME_SIZE, Dataset
from pipeline.datasets.trafficgaze import ENTRY

DATASET = Dataset(
    "drfixd-rainy", "DrFixD-rainy", "DrFixD_rainy", ("trafficframe", "fixdata"),
    "trafficframe", ENTRY, "VV/FFFFFF.jpg", FRAME_SIZE, FRAME_SIZE, "fixations", FixdataReader,
    source="https://github.com/taodeng/DrFixD-rainy",
    terms="the original release's terms (https://github.com/taodeng/DrFixD-rainy); the SalM2"
          " authors' copy: https://huggingface.co/datasets/springyu/DrFixD_rainy",
    citation="the paper named on https://github.com/taodeng/DrFixD-rainy",
    mirror="springyu/DrFixD_rainy")
