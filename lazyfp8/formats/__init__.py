"""The quantization layer: what the quantized tensors of a checkpoint mean.

``schemes`` holds the granularities (per tensor, per channel, blocks, MX) as objects with
behaviour; ``config`` reads a ``quantization_config`` into a scheme; ``pairing`` pairs each
quantized weight with its scale siblings; ``catalogue`` builds, once, what a checkpoint exposes
(used by the view, ``inspect``, the writer and the DCP reader); ``quantize`` is the inverse,
for the writer. Reads nothing but headers and config files.
"""
