#!/usr/bin/env bash
# Source on the lent GPU machine (no network): installs the carried wheels (.whl/) into /tmp/site
# and puts console-script wrappers for their entry points (flwr, flower-superlink, ...) on PATH.
#   . benchmarks/device_setup.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/site-bin
python3 - <<'PY'
import configparser, glob, os
for ep in glob.glob("/tmp/site/*.dist-info/entry_points.txt"):
    cp = configparser.ConfigParser(); cp.optionxform = str; cp.read(ep)
    if not cp.has_section("console_scripts"):
        continue
    for name, target in cp.items("console_scripts"):
        module, func = target.split(":")
        path = f"/tmp/site-bin/{name}"
        with open(path, "w") as f:
            f.write(f"#!/usr/bin/env python3\nimport sys\nfrom {module.strip()} import {func.strip()} as _main\nsys.exit(_main())\n")
        os.chmod(path, 0o755)
PY
cat > /tmp/site-bin/fedtune <<SH
#!/usr/bin/env bash
exec python3 -m app.cli "\$@"
SH
chmod +x /tmp/site-bin/fedtune
export PATH=/tmp/site-bin:$PATH FLWR_TELEMETRY_ENABLED=0 PYTHONUNBUFFERED=1
# Multi-GPU kinds: keep NVLink multicast off (KINDS.md); harmless on one GPU.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
