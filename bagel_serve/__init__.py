"""bagel-serve: an inference and serving engine for BAGEL-7B-MoT and models of its family."""

__version__ = "0.1.0"

from bagel_serve.engine.request import Request, RequestError, RequestOutput
from bagel_serve.entrypoints.omni import Omni

__all__ = ["Omni", "Request", "RequestError", "RequestOutput", "__version__"]
