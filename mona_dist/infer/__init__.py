"""Using a run's checkpoint without training: `mona-dist eval` (the task's metrics on val shards) and
`mona-dist predict` (per-image predictions and pictures).

Both build the model and engine exactly as `mona-dist train` does (`train.setup.start`, `build_model_and_engine`)
and restore the checkpoint through the engine's own resume path (`train.checkpoint.restore_model`: the engine's
state, resharded when the world size differs, and the model's buffers), so eval scores what the run's own eval
scored. Neither writes into the run's output_dir.
"""
