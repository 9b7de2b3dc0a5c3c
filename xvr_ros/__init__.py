"""xvr_ros: intraoperative 2D/3D X-ray registration (xvr) for ROS 2."""

__version__ = "0.1.0"
