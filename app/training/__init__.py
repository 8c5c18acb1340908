"""What trains: the 4-bit base and its DoRA adapter (`model`), a node's partition and prompt
(`data`, `prompt`), the plain training loop (`train`), one client round (`worker`), the resident
trainer process beside each SuperNode (`trainer_service`), GPU sampling (`gpu_monitor`) and the
tiny CPU profile's model and data (`tiny`). Runs at a hospital's node, on its GPU."""
