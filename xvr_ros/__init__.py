"""xvr_ros: intraoperative 2D/3D X-ray registration (xvr) for ROS 2."""

import os

# Before torch loads its OpenMP runtime (every entry point imports this package first): threads
# that finish a parallel region sleep instead of spinning. The nodes share a few cores with each
# other (training, inference, refinement) and with the robot's software; spinning threads take
# the CPU from the thread everyone waits for (README, Performance, has the measurements). An
# explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
