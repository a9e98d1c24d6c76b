"""The algorithm: architecture table, calibration, SmoothQuant, quantized modules, the quantize verb.

Works on a model in memory; knows nothing of files beyond calibration text and statistics.
"""
