"""DSpark: lossless speculative decoding with semi-autoregressive drafters."""

__version__ = "0.1.0"
