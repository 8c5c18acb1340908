"""What protects a hospital's node: the bundle allowlist (`fab_allowlist`), the run-config read
policy (`read_policy`), the runtime patches of flwr 1.42 (`flwr_patches`) and the child-dies-
with-parent guard (`lifeline`). Runs at a hospital's node, around flwr's SuperNode."""
