#!/usr/bin/env bash
# Source on the lent GPU machine (no network): installs the carried wheels (.whl/) into /tmp/site
# and puts console-script wrappers for their entry points (flwr, flower-superlink, ...) on PATH.
#   . benchmarks/device_setup.sh
# The wheels (git-excluded .whl/, carried with the call) were fetched here for the device's
# Python 3.12 with:
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl flwr==1.42.0 protobuf==6.33.6 grpcio==1.85.3 \
#     grpcio-health-checking==1.81.1 iterators==0.0.2 pycryptodome==3.24.1 tomli==2.5.0 tomli-w==1.2.0 \
#     typer==0.20.1 rich==14.3.4 pathspec prompt-toolkit==3.0.53 wcwidth sqlalchemy==2.1.9 greenlet \
#     alembic==1.20.1 mako uvicorn==0.49.0 fastapi==0.138.2 starlette==1.3.1 cryptography==50.0.2 cffi \
#     pycparser pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 typing-inspection \
#     annotated-types python-dotenv bitsandbytes==0.50.2 peft==0.21.2 liger-kernel==0.8.5 \
#     flwr-datasets==0.6.1 datasets==4.8.5 "dill<0.4.2" "multiprocess<0.70.20" dp-accounting==0.6.0 attrs==23.2.0
# and bitsandbytes' wheel stripped of its CUDA 11/12, ROCm and XPU libraries (the device has
# CUDA 13), which brings .whl/ from 70 MiB to 36 MiB, under the 64 MiB a call may carry.
# A warm machine's next call finds them installed: only the app (a fresh copy each call) is compiled again.
stamp=$(ls .whl | sha256sum | cut -c1-16)
if [ "$(cat /tmp/site/.installed 2>/dev/null)" != "$stamp" ]; then
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
# Bytecode, as the images ship it (docker/app.Dockerfile): the device sets PYTHONDONTWRITEBYTECODE=1,
# so without this every ClientApp process compiled flwr from source (4.5-4.8 s a start instead of
# ~1 s on the H200 host, 2026-11-29), which the round times of earlier runs include.
python3 -m compileall -q -j 0 /tmp/site >/dev/null
echo "$stamp" > /tmp/site/.installed
fi
python3 -m compileall -q -j 0 app >/dev/null
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
