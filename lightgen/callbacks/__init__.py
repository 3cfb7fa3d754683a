from lightgen.callbacks.checkpoint import StepCheckpoint
from lightgen.callbacks.progress import RichProgress
from lightgen.callbacks.sample_grid import SampleGrid
from lightgen.callbacks.throughput import Throughput

__all__ = ["StepCheckpoint", "RichProgress", "SampleGrid", "Throughput"]
