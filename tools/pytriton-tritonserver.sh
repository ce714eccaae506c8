#!/usr/bin/env bash
# Run the tritonserver that the nvidia-pytriton wheel bundles (Triton 2.51 with its Python backend, CPU) on a model
# repository, listening on loopback only, and serving the models that load when another cannot
# (--exit-on-error=false: a broken model is not ready; the others serve). For machines without NVIDIA's Triton
# container; tests and the README use it. VENV: a virtual environment holding nvidia-pytriton==0.7.0, numpy<2 and pnp-trt.
#   VENV=DIR tools/pytriton-tritonserver.sh REPOSITORY HTTP_PORT GRPC_PORT METRICS_PORT [tritonserver flags]
set -euo pipefail
venv=${VENV:?set VENV to the virtual environment holding nvidia-pytriton and pnp-trt}
repository=$1 http=$2 grpc=$3 metrics=$4
shift 4
python=$venv/bin/python
site=$("$python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
libdir=$("$python" -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
version=$("$python" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
server=$site/pytriton/tritonserver
# The Python backend starts one stub process per model instance; the wheel keeps a stub per Python version.
[ -e "$server/backends/python/triton_python_backend_stub" ] ||
  cp "$server/python_backend_stubs/$version/triton_python_backend_stub" "$server/backends/python/"
# The stub links libpython from the interpreter's own LIBDIR (not the system's), and takes its site-packages
# from the python3 first on PATH.
export LD_LIBRARY_PATH=$libdir:$site/nvidia_pytriton.libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PATH=$venv/bin:$PATH
exec "$server/bin/tritonserver" --model-repository "$repository" --backend-directory "$server/backends" \
  --http-address 127.0.0.1 --http-port "$http" --grpc-address 127.0.0.1 --grpc-port "$grpc" \
  --metrics-address 127.0.0.1 --metrics-port "$metrics" --exit-on-error=false "$@"
