"""**DR(eye)VE** (Palazzi et al., TPAMI 2018): 74 sequences of 7,500 frames, 1920x1080 at 25 fps,
recorded from a roof-mounted camera while a driver's gaze was tracked.

Layout as downloaded (``DREYEVE_DATA/``; the authors' code, ``ndrplz/dreyeve``, reads it so)::

    dr(eye)ve_design.txt          one line per sequence: number, time of day, weather,
                                  landscape, driver, and (in the release) train/test
    SS/video_garmin.avi           the camera video (SS = 01..74)
    SS/video_saliency_fix.avi     fixation maps: the fixations of the frame's neighbourhood,
                                  blurred (the TPAMI paper's "new" ground truth)
    SS/video_saliency.avi         saliency maps: the fixations integrated over one second
                                  (the CVPRW 2016 ground truth)

The frames are decoded from the videos as they are read (no unrolling step). **Ground truth**:
``saliency_fix`` by default - the one the authors' training code defaults to (``gt_type='fix'``)
and against which their TPAMI tables and the information gain are computed; ``saliency`` on
request (``--ground-truth saliency``; recorded in the manifest, so it is another version).

**Splits**: sequences 1-37 train and 38-74 test (the design file's column where it has one,
else this rule, as the authors' ``config.py``). Validation, our choice: five training
sequences spread over the recording - 04, 12, 20, 28, 36 - held out whole (the authors validated
on frames 3500-3999 of every training sequence, which sit seconds from training frames).
**Frames**: every fifth frame from 15 on, ``range(15, frames - 1, 5)`` - the frames the authors'
metrics script scores - in every split: 1,497 a sequence, 5 per second.

Split entries are ``"SS/FFFFFF"``: the sequence and the 0-based frame index in its videos.
"""

from __future__ import annotations

import re
from pathlib import Path

from pipeline.core.errors import BadInputError
from pipeline.datasets.readers import VideoMapReader
from pipeline.datasets.spec import Dataset
from pipeline.formats.video import video_info

DESIGN = "dr(eye)ve_design.txt"
CAMERA = "video_garmin.avi"
MAPS = {"saliency_fix": "video_saliency_fix.avi", "saliency": "video_saliency.avi"}
"""The gaze-map video of each ground truth (the default first)."""
SEQUENCES = range(1, 75)
TRAIN_SEQUENCES = range(1, 38)
VALID_SEQUENCES = (4, 12, 20, 28, 36)
FIRST, STEP = 15, 5
"""The frames listed: ``range(FIRST, frames - 1, STEP)`` of each sequence."""
FRAME_SIZE = (1080, 1920)


def read_design(root: Path) -> dict[int, str]:
    """{sequence: "train" | "test"} from the design file, in sequence order.

    Raises:
        BadInputError: the file is missing or unreadable, a line does not start with a sequence
            number 1..74, or a sequence is listed twice.
    """
    path = root / DESIGN
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise BadInputError(path, "missing: not a DR(eye)VE root (DREYEVE_DATA holds it)") from None
    except OSError as err:
        raise BadInputError(path, f"cannot read ({err.strerror})") from None
    design: dict[int, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if not fields[0].isdigit() or int(fields[0]) not in SEQUENCES:
            raise BadInputError(path, f"line {number}: expected a sequence number 1..74 first,"
                                f" got {line.strip()[:40]!r}")
        sequence = int(fields[0])
        if sequence in design:
            raise BadInputError(path, f"line {number}: sequence {sequence} is listed twice")
        named = [f.lower() for f in fields[1:] if f.lower() in ("train", "test")]
        design[sequence] = named[-1] if named else (
            "train" if sequence in TRAIN_SEQUENCES else "test")
    return dict(sorted(design.items()))


def split_of(sequence: int, design_split: str) -> str:
    """The split a sequence belongs to: test, valid (:data:`VALID_SEQUENCES`) or train."""
    if design_split == "test":
        return "test"
    return "valid" if sequence in VALID_SEQUENCES else "train"


def split_sequences(root: Path, split: str) -> list[int]:
    """The sequences of ``split``, in order; BadInputError for a bad design file."""
    return [s for s, kind in read_design(root).items() if split_of(s, kind) == split]


def split_names(root: Path, split: str) -> list[str] | None:
    """The entries of ``split`` (None if no sequence of the design file belongs to it): every
    listed frame of its sequences, in sequence then frame order. BadInputError for a bad design
    file or a camera video that is missing or cannot be opened."""
    sequences = split_sequences(root, split)
    if not sequences:
        return None
    names = []
    for sequence in sequences:
        frames = video_info(root / f"{sequence:02d}" / CAMERA).frames
        names += [f"{sequence:02d}/{index:06d}" for index in range(FIRST, frames - 1, STEP)]
    return names


def split_sources(root: Path, split: str) -> list[Path]:
    """The files that define the splits: the design file."""
    return [root / DESIGN]


def split_needs(root: Path, split: str) -> list[str] | None:
    """The videos ``split`` needs (camera and default ground truth), relative to the root."""
    sequences = split_sequences(root, split)
    return [f"{s:02d}/{name}" for s in sequences
            for name in (CAMERA, next(iter(MAPS.values())))] or None


class Reader(VideoMapReader):
    """DR(eye)VE frames: ``SS/video_garmin.avi`` and the ground truth's map video."""

    def locate(self, name: str, video: int, number: int) -> tuple[Path, Path, int]:
        folder = self.root / f"{video:02d}"
        return folder / CAMERA, folder / MAPS[self.ground_truth], number


DATASET = Dataset(
    "dreyeve", "DR(eye)VE", "DREYEVE_DATA", (), "",
    re.compile(r"(\d{2})/(\d{6})"), "SS/FFFFFF", FRAME_SIZE, FRAME_SIZE, "gaze_maps", Reader,
    source="https://aimagelab.ing.unimore.it/imagelab/page.asp?IdPage=8",
    terms="the DR(eye)VE terms of use, stated on its download page (research use; registration"
          " required)",
    citation="Palazzi et al., Predicting the Driver's Focus of Attention: the DR(eye)VE Project,"
             " IEEE TPAMI 2018",
    manual="DR(eye)VE has no Hugging Face mirror. (1) Request it from its page"
           " (https://aimagelab.ing.unimore.it/imagelab/page.asp?IdPage=8) and download the"
           " sequences. (2) Unpack them so that DREYEVE_DATA/ holds dr(eye)ve_design.txt and"
           " the folders 01 .. 74, each with video_garmin.avi, video_saliency_fix.avi and"
           " video_saliency.avi. (3) Check it with `salmm check-layout --dataset dreyeve --root"
           " DREYEVE_DATA`. No unrolling into frames is needed.",
    files=(DESIGN,), splits=split_names, split_sources=split_sources, split_needs=split_needs,
    ground_truths=tuple(MAPS))
