"""Layer-wise mixed int8 quantization by sensitivity (``lamina quantize``)."""

from .quantize import QuantizeConfig, QuantizeResult, load_quantized, quantize, sensitivity  # noqa: F401

__all__ = ["quantize", "QuantizeConfig", "QuantizeResult", "load_quantized", "sensitivity"]
