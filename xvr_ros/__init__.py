"""xvr_ros: intraoperative 2D/3D X-ray registration (xvr) for ROS 2."""

import os

# Before torch loads its OpenMP runtime (every entry point imports this package first): threads
# that finish a parallel region sleep instead of spinning. The nodes share a few cores with each
# other (training, inference, refinement) and with the robot's software; spinning threads take
# the CPU from the thread everyone waits for. One 128 px refinement iteration on this 2-core CPU,
# default (active) vs PASSIVE: idle machine 27 vs 32 ms; next to one busy process 87 vs 60 ms;
# next to another 2-thread torch process 290 vs 48 ms. An explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
