"""The Ray Data stages of a render run, in graph order: read, prepare, render, finish (see pipeline.dataflow)."""
