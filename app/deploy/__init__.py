"""Deployment tooling: the native launcher, the Compose generator and driver, certificates and
the GPU memory plan. The federated app itself (client/server apps, training, data, wire) lives
one level up in `app/`."""
