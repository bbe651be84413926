"""The method: the dead-zone quantizer, its kernels and quantile selection, insertion, BOPs.

Pure tensor math with no I/O; imports nothing from codeq but :mod:`codeq_cli.errors`.
See ``docs/method.md`` and ``docs/architecture.md``.
"""
