"""Latency profiling: engines, the ONNX export path, timing, latency tables, term profiling.

- :mod:`profilers.engines`: inference engines behind one protocol (``get_engine(name)``).
- :mod:`profilers.export`: the one ONNX export path (``export_onnx``).
- :mod:`profilers.timing`: the one timing protocol (``measure``, ``measure_interleaved``).
- :mod:`profilers.table`: latency tables in SQLite (``LatencyTable``, ``default_table_path``).
- :mod:`profilers.profile`: measure a pruning space's terms into a table (``profile_space``).
- :mod:`profilers.device_label`: ``cpu`` or the GPU model, for table folders.

This package knows nothing of importance, plans or solvers.
"""
