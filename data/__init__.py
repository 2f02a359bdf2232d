"""The data pipeline: records -> samples -> batches, split out of dataset.py, one concern a module.

sources/ (where records come from: .json, .jsonl, Parquet/Arrow; a registry, see its docstring),
errors, json_text, schema (a record's form), media (images, videos), slicing, placeholders, layouts
(chat layouts as data), records (RecordDataset), preference (DPO pairs), packing, native (the native
models' processor pipeline), preflight_report (reasons, table, report) and preflight_cache (a
run's preflight results, reused on restart). dataset.py, at the top level, holds the remote-code SupervisedDataset
and its slice-aware DataCollator; preflight.py checks every record before training.
"""
