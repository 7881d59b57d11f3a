"""Versioned files the runtime reads and the tools write, at the bottom of the import order so that the
engine, the models and the layers read them without importing the tools: the engine directory's manifest
(manifest.py), streamed safetensors (safetensors_io.py), the calibration directory's statistics
(calibration.py)."""
