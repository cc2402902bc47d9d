"""Expert pruning and dynamic expert skipping for Mixture-of-Experts language models.

The library knows nothing of DVC: every function takes plain values and paths.
"""

from pipeline.errors import PipelineError

__all__ = ["PipelineError"]
__version__ = "0.1.0"
