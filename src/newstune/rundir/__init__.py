"""Run directory: the unit users share, read and written through one place.

Owns the layout of a run folder (config, label map, metrics, decision, adapter, ensemble files, exports), loading a
finished run for use (`run.load_run`), validating every file it reads as untrusted input (`files`), and writing
outputs without ever overwriting a user's earlier results (`staging`).
May import: the leaves (`config`, `errors`, `paths`, `tables`), `data`, `modeling`, `decisions`.
"""
