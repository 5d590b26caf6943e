"""lightning-repair: training-free, label-free repair of highly sparse CNNs."""

from .datamodule import ImageDataModule
from .dense import DenseClassifier
from .models import Network
from .pipeline import PruneRepairModule

__all__ = ["DenseClassifier", "ImageDataModule", "Network", "PruneRepairModule"]
__version__ = "0.1.0"
