# Source me: the environment `make` targets run in (venv + ROS prefix + the colcon install).
# shellcheck disable=SC1091
. "$(dirname "${BASH_SOURCE[0]}")/../.venv/bin/activate"
export AMENT_PREFIX_PATH=$VIRTUAL_ENV CMAKE_PREFIX_PATH=$VIRTUAL_ENV
. "$(dirname "${BASH_SOURCE[0]}")/../install/setup.bash"
