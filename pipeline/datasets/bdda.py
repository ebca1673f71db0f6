"""**BDDA** (Berkeley DeepDrive Attention): ``camera_frames/VVVV/FFFF.jpg`` camera frames and
``gazemap_frames/VVVV/FFFF.jpg`` greyscale gaze maps of the same name (nominally 1024x576),
split entries ``"VVVV/FFFF.jpg"``."""

from __future__ import annotations

import re

from pipeline.datasets.readers import GazeMapReader
from pipeline.datasets.spec import FRAME_SIZE, Dataset

GAZE_MAP_SIZE = (576, 1024)
"""(height, width) of the gaze maps as released: what the ground truth refers to."""

DATASET = Dataset(
    "bdda", "BDDA", "BDDA", ("camera_frames", "gazemap_frames"), "camera_frames",
    re.compile(r"(\d{4})/(\d{4})\.jpg"), "VVVV/FFFF.jpg", FRAME_SIZE, GAZE_MAP_SIZE,
    "gaze_maps", GazeMapReader,
    source="https://deepdrive.berkeley.edu/",
    terms="the Berkeley DeepDrive terms of use (https://bdd-data.berkeley.edu/)",
    citation="Xia et al., Predicting Driver Attention in Critical Situations, ACCV 2018",
    manual="BDDA has no Hugging Face mirror. (1) Download the SalM2 authors' copy from Baidu Pan"
           " (the link is in https://github.com/zhao-chunyu/SaliencyMamba's README, extraction"
           " code BDDA): its camera_frames/ and gazemap_frames/ are the frames the published"
           " split files list. (2) Unpack it into a folder BDDA/ holding camera_frames/,"
           " gazemap_frames/ and the split files (train.json, valid.json, test.json; also in"
           " that repository's datasets/ folder). (3) Check it with `salmm check-layout"
           " --dataset bdda --root BDDA`. The original BDD-A release"
           " (https://bdd-data.berkeley.edu/, registration required) ships videos, not these"
           " frames.")
