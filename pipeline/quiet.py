"""Third-party progress bars (transformers' "Loading weights", datasets' map and save) stay quiet: the
stages print their own progress lines (tokens/s, ETA). Both libraries read these variables once, at
import, so this runs before them; a value already in the environment wins."""

from __future__ import annotations

import os

QUIET_BARS = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS")


def quiet_progress_bars() -> None:
    for key in QUIET_BARS:
        os.environ.setdefault(key, "1")
