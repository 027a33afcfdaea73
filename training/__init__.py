"""cnc-hf training (installed as `cnc_hf_train`, open_clip_train style): Accelerate training (train.py: setup,
one epoch, finish; args.py: the flags; checks.py, data.py, outputs.py: what setup and finish call),
checkpoints, feature cache, sharding, benchmarks. Imports cnc_hf; cnc_hf never imports it."""
