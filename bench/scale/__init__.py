"""The 1 B-parameter run of the whole chain (`python -m bench.scale.run_scale`) and its memory measurements."""

from bench.local_env import apply_defaults

# DeepSpeed on the CPU, hubs offline, as `make run`; set before anything imports deepspeed (the launched processes
# inherit it).
apply_defaults()
