"""Lightning callbacks of genframe: the ones every run gets and the ones configs choose
(``conf/callbacks/*.yaml`` name them as ``genframe.callbacks.<Class>``)."""

from genframe.callbacks.alignment import PromptAlignment
from genframe.callbacks.checkpoint import AtomicCheckpointIO, LastCheckpoint, ResumeState
from genframe.callbacks.finite_loss import FiniteLossGuard
from genframe.callbacks.progress import ProgressLine, RichProgressBar, SplitProgressBar
from genframe.callbacks.sample_grid import SampleGrid
from genframe.callbacks.sample_quality import SampleQuality

__all__ = [
    "AtomicCheckpointIO", "FiniteLossGuard", "LastCheckpoint", "ProgressLine", "PromptAlignment",
    "RichProgressBar", "SampleGrid", "SampleQuality",
    "ResumeState", "SplitProgressBar",
]
