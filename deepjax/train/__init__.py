"""Training: configs, the optimizer (`optim`), the pure train step (`step`), Orbax checkpoints (`checkpoint`), the
run directory every job shares (`run`), the loop behind `deepjax train` (`loop`) and the TPU compile check
(`compile_check`)."""
