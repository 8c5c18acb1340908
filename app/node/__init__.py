"""What protects a hospital's node: the bundle allowlist (`fab_allowlist`), the run-config read
policy (`read_policy`), the runtime patches of flwr 1.42 (`flwr_patches`) and the child-dies-
with-parent guard (`lifeline`); and what starts its ClientApps warm (`clientapp_forkserver`: a
fork server per SuperNode, on unless FEDTUNE_CLIENTAPP_FORKSERVER=0; `clientapp_shim`: the
`flwr-clientapp` shim's side of it). Runs at a hospital's node, around flwr's SuperNode."""
