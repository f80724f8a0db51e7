"""Use: load a meta-trained checkpoint, adapt it to a user's task and predict (``mamlkit.load``); raw
inputs (image folders, CSVs, text) as tensors; prediction files."""
