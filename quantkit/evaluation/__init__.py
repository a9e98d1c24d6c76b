"""Measuring and reporting: perplexity, bytes, speed and memory; per-layer error; the static-cache
decoder; the jobs the CLI runs (quantize to disk, evaluate, the whole default run); Markdown and HTML
reports. Built on :mod:`quantkit.formats` and :mod:`quantkit.core`."""
