from lightgen.callbacks.fid import FIDCallback
from lightgen.callbacks.nonfinite import NonFiniteGuard, NonFiniteTraining
from lightgen.callbacks.progress import RichProgress
from lightgen.callbacks.sample_grid import SampleGrid
from lightgen.callbacks.step_checkpoint import StepCheckpoint
from lightgen.callbacks.throughput import Throughput

__all__ = [
    "FIDCallback",
    "NonFiniteGuard",
    "NonFiniteTraining",
    "StepCheckpoint",
    "RichProgress",
    "SampleGrid",
    "Throughput",
]
