"""The compute layer: a box becomes rectangles, and rectangles become values in a destination.

``plan`` cuts a box of a tensor into rectangles that each meet one scale; ``source`` reads a
rectangle's codes and scales and runs a kernel into the destination; ``dequant`` holds the
pure-torch kernels (the reference the others are tested against); ``jit``/``ir``/``jit_cache``
the compiled CPU kernels; ``cuda`` the device path; ``parallel`` the worker threads.
"""
