"""pixelformer: transformers on individual pixels, for classification, MAE pretraining and DiT diffusion."""
from .errors import CheckpointError, UserError
from .models import create_backbone, list_backbones

__version__ = "0.1.0"
__all__ = ["CheckpointError", "UserError", "create_backbone", "list_backbones", "__version__"]
