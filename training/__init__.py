"""cnc-hf training (installed as `cnc_hf_train`, open_clip_train style): Accelerate training, checkpoints,
feature cache, sharding, benchmarks. Imports cnc_hf; cnc_hf never imports it."""
